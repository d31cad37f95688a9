"""A department's own configuration: who it is, where its data and ledger live, and its privacy budget.

In deployment this comes from the site's TOML file (`node_config["site-config"]`); the server's job can never
change it. In simulation the operator plays every site, so `simulated_site` derives it from the simulation config.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

import pandas as pd

from client.policy import SitePolicy
from common import keys
from common.config import ACCOUNTANTS, JobConfig, SimulationConfig
from common.data import DEPARTMENT, HUTTO_DEPARTMENTS, LABEL, TEXT, Split, departments_of, load_source, split_department
from common.errors import ConfigError, DataError
from common.preflight import check_department_data


def _has_type(value: object, kind: str) -> bool:
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, {"str": str, "bool": bool}[kind])


@dataclass(frozen=True)
class SiteConfig:
    name: str  # department name, as reported to the server
    data: str  # "hutto" or the path of the site's data file
    epsilon: float  # the site's total privacy budget ...
    delta: float  # ... at this delta
    ledger: str  # path of the site's privacy ledger
    text_column: str = TEXT
    label_column: str = LABEL
    department_column: str = ""  # optional: keep only rows whose department equals `name`
    accountant: str = "rdp"  # Opacus accountant the ledger is kept with
    require_secagg: bool = True  # refuse to send an update unless it is masked by SecAgg+
    allow_non_private: bool = False  # refuse jobs that turn DP-SGD off
    test_fraction: float = 0.2  # share of the site's data held out for federated evaluation
    split_seed: int = 0
    # Deployment (fedsilo client start): where the coordination server is and how this site proves who it is.
    server: str = ""  # SuperLink address host:port
    ca: str = ""  # CA certificate the server's TLS certificate must chain to
    node_key: str = ""  # this site's private node key (OpenSSH, EC P-384), registered at the server
    insecure: bool = False  # plaintext, no node authentication: local development only
    # What this site accepts from a job (the [policy] table): approved app bundles, per-job limits, server pin.
    policy: SitePolicy = field(default_factory=SitePolicy)

    def validate(self) -> None:
        if not self.name.strip():
            raise ConfigError("Site config key 'name' must not be empty.")
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ConfigError(f"Site config key 'epsilon' must be positive, got {self.epsilon}.")
        if not 0 < self.delta < 1:
            raise ConfigError(f"Site config key 'delta' must be in (0, 1), got {self.delta}.")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"Site config key 'accountant' must be one of {ACCOUNTANTS}, got {self.accountant!r}.")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"Site config key 'test_fraction' must be in (0, 1), got {self.test_fraction}.")
        if not self.ledger:
            raise ConfigError("Site config key 'ledger' must name the ledger file.")

    @classmethod
    def from_toml(cls, path: Path) -> SiteConfig:
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"Site config {path} cannot be read: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"Site config {path} is not valid TOML: {exc}") from exc
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ConfigError(f"Site config {path}: unknown key(s) {unknown}; known: {sorted(known)}.")
        missing = sorted(k for k in ("name", "data", "epsilon", "delta", "ledger") if k not in doc)
        if missing:
            raise ConfigError(f"Site config {path}: missing key(s) {missing}.")
        for f in fields(cls):
            if f.name in doc and f.name != "policy" and not _has_type(doc[f.name], str(f.type)):
                raise ConfigError(f"Site config {path}: key '{f.name}' must be of type {f.type}, "
                                  f"got {doc[f.name]!r}.")
        if "policy" in doc:
            doc["policy"] = SitePolicy.from_table(doc["policy"], path)
        base = path.parent
        doc["data"] = doc["data"] if doc["data"] == "hutto" else str((base / doc["data"]).resolve())
        for key in ("ledger", "ca", "node_key"):
            if doc.get(key):
                doc[key] = str((base / doc[key]).resolve())
        try:
            cfg = cls(**doc)
        except TypeError as exc:
            raise ConfigError(f"Site config {path}: {exc}") from exc
        cfg.validate()
        return cfg

    def _frame(self) -> tuple[pd.DataFrame, str]:
        frame = load_source(self.data, self.text_column, self.label_column, self.department_column or None)
        department = self.name if (self.department_column or self.data == "hutto") else frame[DEPARTMENT].iloc[0]
        if department not in set(frame[DEPARTMENT]):
            raise DataError(f"Site {self.name!r}: no rows for department {department!r} in {self.data}.")
        return frame, department

    def load_split(self, labels: tuple[str, ...]) -> Split:
        """This site's train/test split, with labels indexed in the job's label order."""
        frame, department = self._frame()
        return split_department(frame, department, labels, self.test_fraction, self.split_seed)

    def check_data(self) -> int:
        """Load the site's data as a job would (file, encoding, columns, its department's rows); return the row
        count. The job's labels are not known yet, so they are checked when a job arrives."""
        frame, department = self._frame()
        return int((frame[DEPARTMENT] == department).sum())


def preflight_sites(sites: list[SiteConfig], job: JobConfig) -> dict[str, int]:
    """What every department checks before it trains, done once up front: the model resolves, and each
    department's data splits into usable training data (labels, size, classes, delta). Returns training sizes."""
    from common.model import resolve_model_dir  # imports torch: only here, not for `fedsilo budget`

    resolve_model_dir(job.model)
    sizes: dict[str, int] = {}
    for site in sites:
        split = site.load_split(job.label_names)
        check_department_data(site.name, split.train_labels, job.label_names, batch_size=job.batch_size,
                              delta=site.delta if job.dp else None)
        sizes[site.name] = len(split.train_labels)
    return sizes


def simulated_sites(job: JobConfig, sim: SimulationConfig, out_dir: Path) -> list[SiteConfig]:
    """The site configs of a simulation: one per department of the simulation's data, in sorted order."""
    if sim.sim_data == "hutto":
        departments = sorted(HUTTO_DEPARTMENTS)
    else:
        departments = departments_of(
            load_source(sim.sim_data, sim.sim_text_column, sim.sim_label_column, sim.sim_department_column))
    unknown = sorted(set(sim.site_epsilon_overrides()) - set(departments))
    if unknown:
        raise ConfigError(f"Config key 'sim-site-epsilons' names unknown department(s) {unknown}.")
    return [
        SiteConfig(name=d, data=sim.sim_data, epsilon=sim.site_epsilon(d), delta=sim.sim_delta,
                   ledger=str(out_dir / "sites" / d / "ledger.json"), text_column=sim.sim_text_column,
                   label_column=sim.sim_label_column, department_column=sim.sim_department_column,
                   require_secagg=job.secagg, allow_non_private=not job.dp, test_fraction=sim.sim_test_fraction,
                   split_seed=job.seed)
        for d in departments
    ]


def resolve_site(node_config: dict[str, bool | int | float | str], job: JobConfig, sim: SimulationConfig,
                 out_dir: Path) -> SiteConfig:
    """The site this node is: its own TOML in deployment, or partition `partition-id` in simulation."""
    if keys.NODE_SITE_CONFIG in node_config:
        return SiteConfig.from_toml(Path(str(node_config[keys.NODE_SITE_CONFIG])))
    if keys.NODE_PARTITION_ID not in node_config:
        raise ConfigError(f"Node config needs '{keys.NODE_SITE_CONFIG}' (deployment) or "
                          f"'{keys.NODE_PARTITION_ID}' (simulation).")
    sites = simulated_sites(job, sim, out_dir)
    pid = int(node_config[keys.NODE_PARTITION_ID])
    if not 0 <= pid < len(sites):
        raise ConfigError(f"Partition {pid} does not exist: the simulation data has {len(sites)} departments.")
    return sites[pid]

"""A department's own configuration: who it is, where its data and ledger live, and its privacy budget.

In deployment this comes from the site's TOML file (`node_config["site-config"]`); the server's job can never
change it. In simulation the operator plays every site, so `simulated_site` derives it from the simulation config.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from client.policy import SitePolicy
from common import keys
from common.config import ACCOUNTANTS, JobConfig, SimulationConfig
from common.data import (
    BUILTIN_SOURCES,
    DEPARTMENT,
    HUTTO_DEPARTMENTS,
    LABEL,
    TEXT,
    Split,
    departments_of,
    load_source,
    split_department,
)
from common.errors import ConfigError, DataError
from common.preflight import check_department_data
from common.settings import Settings, format_keys, load, option

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class SiteConfig(Settings):
    """A department's own configuration (its TOML file in deployment; derived from the simulation config in
    simulation)."""

    label: ClassVar[str] = "Site config key"

    name: str = option(help="department name, as reported to the server", nonempty=True)
    data: str = option(help='"hutto", "hutto-small" or the path of the site\'s data file (CSV/TSV/JSONL/Parquet; '
                       "relative to the site config)")
    epsilon: float = option(help="the site's total privacy budget epsilon ...", gt=0)
    delta: float = option(help="... at this delta", gt=0, lt=1)
    ledger: str = option(help="path of the site's privacy ledger (relative to the site config)", nonempty=True)
    text_column: str = option(TEXT, help="text column of the data file")
    label_column: str = option(LABEL, help="label column of the data file")
    department_column: str = option("", help="optional department column: only rows whose department equals "
                                    "`name` are used")
    accountant: str = option("rdp", help="Opacus accountant the ledger is kept with", choices=ACCOUNTANTS)
    require_secagg: bool = option(True, help="refuse to send an update unless it is masked by SecAgg+")
    allow_non_private: bool = option(False, help="accept jobs that turn DP-SGD off")
    test_fraction: float = option(0.2, help="share of the site's data held out for federated evaluation",
                                  gt=0, lt=1)
    split_seed: int = option(0, help="seed of the train/test split")
    # Deployment (fedsilo client start): where the coordination server is and how this site proves who it is.
    server: str = option("", help="SuperLink address host:port (`fedsilo client start`)")
    ca: str = option("", help="CA certificate the server's TLS certificate must chain to (relative to the site "
                     "config)")
    node_key: str = option("", help="this site's private node key (OpenSSH, EC P-384), registered at the server "
                           "(relative to the site config)")
    insecure: bool = option(False, help="plaintext, no node authentication: local development only")
    poll_seconds: float = option(0.5, help="how long the SuperNode waits before asking the server again when it "
                                 "has no message (Flower's own wait is 3 s: each of a round's message exchanges "
                                 "waits up to this long); a shorter wait costs the server one small request more. "
                                 "After answering a message it asks again after 0.05 s, then half as long again "
                                 "each time up to this wait (a round's next message usually follows soon)",
                                 ge=0.05, le=3)
    heartbeat_seconds: float = option(30.0, help="how often the SuperNode tells the server it is alive; the server "
                                      "counts the site gone, and a round stops waiting for it, after 2 intervals "
                                      "without one (Flower's own interval is 30 s; its server accepts 10 to 1800)",
                                      ge=10, le=1800)
    threads: int = option(0, help="CPU threads the site's training and evaluation use (torch, through "
                          "OMP_NUM_THREADS in the SuperNode's environment); 0 keeps torch's default, one per core. Set "
                          "it where the site shares its machine with other sites or services: threads of several "
                          "processes competing for the same cores slow every one of them", ge=0, le=1024)
    warm_worker: bool = option(True, help="serve a run's messages in one warm process per run (client.worker: the "
                               "site's installed fedsilo, started by the gate after its checks, reachable only by "
                               "the site's user) instead of a fresh process per message")
    warm_worker_idle_seconds: float = option(300.0, help="a warm worker ends after this long without a message",
                                             gt=0)
    policy: SitePolicy = option(  # noqa: RUF009 (option() is dataclasses.field with metadata)
        help="what this site accepts from a job: the [policy] table (below)", default_factory=SitePolicy)

    @classmethod
    def from_toml(cls, path: Path) -> SiteConfig:
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"Site config {path} cannot be read: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"Site config {path} is not valid TOML: {exc}") from exc
        base = path.parent
        if isinstance(doc.get("data"), str) and doc["data"] not in BUILTIN_SOURCES:  # relative to the site config
            doc["data"] = str((base / doc["data"]).resolve())
        for key in ("ledger", "ca", "node_key"):
            if isinstance(doc.get(key), str) and doc[key]:
                doc[key] = str((base / doc[key]).resolve())
        return load(cls, doc, where=f"Site config {path}")

    def _frame(self) -> tuple[pd.DataFrame, str]:
        frame = load_source(self.data, self.text_column, self.label_column, self.department_column or None)
        named = self.department_column or self.data in BUILTIN_SOURCES
        department = self.name if named else frame[DEPARTMENT].iloc[0]
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


def site_config_help(width: int = 100) -> str:
    """Every key of a site config and of its [policy] table with its type, default, allowed values and help text:
    a plain-text block for an argparse epilog (with `argparse.RawDescriptionHelpFormatter`)."""
    return (f"site config keys (TOML; paths relative to the file):\n{format_keys(SiteConfig, width=width)}\n"
            f"[policy] keys:\n{format_keys(SitePolicy, width=width)}")


def preflight_sites(sites: list[SiteConfig], job: JobConfig) -> dict[str, int]:
    """What every department checks before it trains, done once up front: the model resolves, and each
    department's data splits into usable training data (labels, size, classes, delta). Returns training sizes."""
    from common.model import resolve_model_dir  # imports torch: only here, not for `fedsilo budget`

    resolve_model_dir(job.model)
    sizes: dict[str, int] = {}
    for site in sites:
        split = site.load_split(job.label_names)
        check_department_data(site.name, split.train_labels, job.label_names,
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
                   split_seed=job.seed if sim.sim_split_seed < 0 else sim.sim_split_seed)
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

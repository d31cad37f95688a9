"""The federated workflow: Flower's legacy `DefaultWorkflow`, with SecAgg+ for the fit stage when enabled.

This module and `server.strategy` are the server's only users of Flower's legacy API, which SecAgg+ requires in
Flower 1.41 (with the new `strategy.start()` API, `secaggplus_mod` fails on every client and the run "succeeds"
with the initial weights).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any, cast

from flwr.app import Context, Message, RecordDict
from flwr.common import Parameters
from flwr.server import Grid, LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid as GridBase

from common.config import JobConfig
from server import aggregation
from server.compat import (
    MAIN_CONFIGS_RECORD,
    SECAGG_CONFIGS_RECORD,
    SecAggKey,
    Workflow,
    WorkflowKey,
    default_evaluate_workflow,
    default_fit_workflow,
)
from server.strategy import FedSiloStrategy

log = logging.getLogger(__name__)

SECAGG_MODULUS = 2**32  # Flower's mask modulus; sums overflow past modulus / quantization_range departments
POLL_SECONDS = 0.1  # how often an exchange asks the grid for its replies (Flower's deployment grid: every 3 s)
FIRST_POLL_SECONDS = 0.01  # ... after its first waits, 0.01 s growing by half each time up to POLL_SECONDS: a
POLL_GROWTH = 1.5  # quick reply (in simulation, in-memory) is collected within about 10-20 ms, not 50 ms on average


OnHalt = Callable[[int, list[BaseException], int], None]  # round, failures, attempt
OnDropout = Callable[[int, str, set[int], int], None]  # round, stage, node ids, attempt
STAGES = ("setup_stage", "share_keys_stage", "collect_masked_vectors_stage", "unmask_stage")


def _current_round(context: Context) -> int:
    return cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])


def neighbourhood(num_shares: float, threshold: float, sampled: int) -> tuple[int, int]:
    """The round's SecAgg+ neighbourhood size k (the department itself included) and reconstruction threshold t
    (shares), for `sampled` departments.

    `num_shares` as Flower's SecAggPlusWorkflow reads it: a count (> 1) is capped at `sampled` (every department
    is a neighbour when the round has that many or fewer: Flower would share keys with k shares among fewer
    departments, and a threshold from k that no department can reach); a fraction (<= 1) is Flower's own
    rounding (round(f * n), odd unless everyone, everyone when that is 2 or less). `threshold`: a count (> 1) is
    taken as it is, a fraction of k is rounded as Flower does (round(t * k), at least 2); either way t is raised
    to a strict majority of k (k // 2 + 1): the server decides whom it reports as dropped, so unmasking a
    department takes 2t - k colluding neighbours, none at t <= k / 2.
    """
    if sampled < 2:
        raise ValueError(f"SecAgg+ needs at least 2 departments in a round, got {sampled}")
    if num_shares > 1:
        k = min(int(num_shares), sampled)
    else:
        k = round(num_shares * sampled)
        if k < sampled and k % 2 == 0:
            k += 1
        if k <= 2:
            k = sampled
    t = int(threshold) if threshold > 1 else max(round(threshold * k), 2)
    t = min(max(t, k // 2 + 1), k)
    return k, t


def trim_shares(replies: Iterable[Message], threshold: int) -> None:
    """Keep, in each unmask-stage reply, only the shares that bring their owner's count up to `threshold`.

    Flower's unmask stage reconstructs each department's secret from every share it collected
    (`combine_shares`: pure-Python Lagrange interpolation, whose cost grows with the number of shares), although
    any `threshold` of them give the same secret (issue 17 measured 2.0 s with every share vs 0.66 s with the
    threshold's, per department at 100 departments). The replies are
    edited in place, in the order they came; owners with fewer shares keep them all (Flower then halts: not enough
    shares). Error replies and replies without shares are left alone."""
    counts: dict[int, int] = {}
    for reply in replies:
        if reply.has_error() or SECAGG_CONFIGS_RECORD not in reply.content.config_records:
            continue
        record = reply.content.config_records[SECAGG_CONFIGS_RECORD]
        if SecAggKey.NODE_ID_LIST not in record or SecAggKey.SHARE_LIST not in record:
            continue
        kept_owners: list[int] = []
        kept_shares: list[bytes] = []
        owners = cast(list[int], record[SecAggKey.NODE_ID_LIST])
        shares = cast(list[bytes], record[SecAggKey.SHARE_LIST])
        for owner, share in zip(owners, shares, strict=True):
            if counts.get(owner, 0) < threshold:
                counts[owner] = counts.get(owner, 0) + 1
                kept_owners.append(owner)
                kept_shares.append(share)
        if len(kept_owners) < len(owners):
            record[SecAggKey.NODE_ID_LIST] = kept_owners
            record[SecAggKey.SHARE_LIST] = kept_shares


class _ThresholdSharesGrid:
    """The unmask stage's grid: `grid`, except that the replies of its exchange carry only `threshold` shares of
    each department (`trim_shares`). Flower's unmask stage calls only `send_and_receive`."""

    def __init__(self, grid: Grid, threshold: int) -> None:
        self._grid = grid
        self._threshold = threshold

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        trim_shares(replies, self._threshold)
        return replies


class _SizingStrategy:
    """The strategy, for Flower's setup stage: its `configure_fit` also sizes the round's neighbourhood by the
    departments it sampled (`on_sampled`), before Flower reads the workflow's `num_shares` and threshold."""

    def __init__(self, strategy: Any, on_sampled: Callable[[int], None]) -> None:
        self._strategy = strategy
        self._on_sampled = on_sampled

    def __getattr__(self, name: str) -> Any:
        return getattr(self._strategy, name)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> Any:
        sampled = self._strategy.configure_fit(server_round, parameters, client_manager)
        if len(sampled) >= 2:  # fewer: Flower's setup stage halts the round before it reads the neighbourhood
            self._on_sampled(len(sampled))
        return sampled


class ReportingSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, unchanged, except that it reports which departments dropped out in which stage
    and a halted round's failures (Flower only logs them; the strategy never sees a halted round), retries a
    halted round up to `retries` times (each attempt is Flower's whole protocol, from a fresh setup), sizes each
    round's neighbourhood and threshold by the departments sampled (`neighbourhood`), and unmasks each department
    from exactly the threshold number of shares (`trim_shares`)."""

    def __init__(self, *args: Any, on_halt: OnHalt, on_dropout: OnDropout, retries: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # As configured; Flower's setup stage reads `num_shares` / `reconstruction_threshold`, set per round.
        self._configured = (float(self.num_shares), float(self.reconstruction_threshold))
        self._retries = retries
        self._attempt = 1
        self._halted = False
        for name in STAGES:
            setattr(self, name, self._reporting(name.removesuffix("_stage"), getattr(self, name), on_halt,
                                                on_dropout))

    def __call__(self, grid: Grid, context: Context) -> None:
        for attempt in range(1, self._retries + 2):
            self._attempt, self._halted = attempt, False
            super().__call__(grid, context)
            if not self._halted:
                return
            if attempt <= self._retries:
                log.warning("round %s: secure aggregation halted; retrying the round (attempt %d of %d)",
                            _current_round(context), attempt + 1, self._retries + 1)

    def setup_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        """Flower's setup stage, with the neighbourhood and threshold of the departments the strategy sampled."""
        sizing = copy.copy(context)  # the same state, history and client manager; only the strategy is wrapped
        sizing.strategy = cast(Any, _SizingStrategy(context.strategy, self._size_round))
        return cast(bool, super().setup_stage(grid, sizing, state))

    def _size_round(self, sampled: int) -> None:
        k, t = neighbourhood(*self._configured, sampled)
        self.num_shares, self.reconstruction_threshold = k, t
        log.info("SecAgg+: %d departments sampled; neighbourhoods of %d, threshold %d shares (unmasking one "
                 "department takes %d colluding neighbours with a server that follows the protocol, %d with one "
                 "that lies about dropouts; each neighbourhood tolerates %d dropped)", sampled, k, t, t, 2 * t - k,
                 k - t)

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        """Flower's unmask stage, unless fewer than `MIN_SUMMANDS` collected updates have weight (a "sum" of one
        update is that update; of none, a division by zero): `skip_unmask_below_floor`. Each department's secret
        is combined from exactly the threshold number of shares (`trim_shares`)."""
        if skip_unmask_below_floor(context, state):
            return True
        trimmed = cast(Grid, _ThresholdSharesGrid(grid, int(state.threshold)))
        return cast(bool, super().unmask_stage(trimmed, context, state))

    def _reporting(self, stage_name: str, stage: Callable[..., bool], on_halt: OnHalt,
                   on_dropout: OnDropout) -> Callable[..., bool]:
        def run(grid: Grid, context: LegacyContext, state: Any) -> bool:
            before = set(state.active_node_ids)
            ok = stage(grid, context, state)
            if stage_name == "setup":  # the stage samples the departments: all of them were asked
                before = set(state.sampled_node_ids)
            dropped = before - set(state.active_node_ids)
            if dropped:
                on_dropout(_current_round(context), stage_name, dropped, self._attempt)
            if stage_name in ("setup", "share_keys"):
                _forget_unmasked_dropouts(state)
            if not ok:
                self._halted = True
                on_halt(_current_round(context), list(state.failures), self._attempt)
            return ok

        return run


class StageTimeoutGrid(GridBase):
    """`grid`, except that an exchange waits at most `timeout` seconds for its replies and polls for them every
    `poll_interval` seconds.

    Flower's legacy fit and evaluate workflows (and SecAgg+ without its own timeout) wait for every reply until the
    message's TTL (12 h). The SuperLink answers for a node that stops heartbeating (NODE_UNAVAILABLE), but not for
    a live node whose ClientApp hangs or never replies: that department would hold the whole job. With this, its
    missing reply makes it a dropout of that stage (SecAgg+ reconstructs its masks from the others' shares).

    `send_and_receive` is Flower's own (push the messages, pull their replies until all came or the time is up),
    through the grid's public `push_messages` / `pull_messages`, but it polls after 0.01 s, then half as long again each
    time up to every 0.1 s (the simulation's `InMemoryGrid` polls every 0.1 s), where the deployment grid sleeps 3 s
    between pulls: a round has two exchanges (five with SecAgg+), and each waited on average 1.5 s for nothing.
    `sleep` and `clock` are there for tests.
    """

    def __init__(self, grid: Grid, timeout: float, *, poll_interval: float = POLL_SECONDS,
                 sleep: Callable[[float], None] | None = None, clock: Callable[[], float] | None = None) -> None:
        self._grid = grid
        self._timeout = timeout
        self._poll_interval = poll_interval
        self._sleep = time.sleep if sleep is None else sleep
        self._clock = time.monotonic if clock is None else clock
        # node id -> the code of its error reply in the last exchange (Flower's workflows keep only the text)
        self.error_replies: dict[int, int] = {}

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:  # Flower's NodeInfo messages (the registration name among them)
        return registered_nodes(self._grid)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push `messages`, then pull their replies until every one came or `timeout` (the stage timeout if None)
        passed; the replies that came, in the order they came. The nodes that did not answer are logged."""
        out = list(messages)
        limit = self._timeout if timeout is None else timeout
        # The deployment grid returns None for a message it could not push (Flower logs it); no reply will come.
        pending = {message_id for message_id in self._grid.push_messages(out) if message_id}
        deadline = self._clock() + limit
        replies: list[Message] = []
        wait = min(FIRST_POLL_SECONDS, self._poll_interval)
        while pending:
            pulled = list(self._grid.pull_messages(pending))
            replies.extend(pulled)
            pending.difference_update(reply.metadata.reply_to_message_id for reply in pulled)
            remaining = deadline - self._clock()
            if not pending or remaining <= 0:
                break
            self._sleep(min(wait, remaining))
            wait = min(POLL_GROWTH * wait, self._poll_interval)
        self.error_replies = {r.metadata.src_node_id: int(r.error.code) for r in replies if r.has_error()}
        silent = {m.metadata.dst_node_id for m in out} - {r.metadata.src_node_id for r in replies}
        if silent:
            # The workflows record them as dropouts of the stage (the strategy's and SecAgg+'s own bookkeeping).
            log.warning("no reply from node(s) %s within %.0fs (stage-timeout); they count as dropped",
                        sorted(silent), limit)
        return replies


def skip_unmask_below_floor(context: LegacyContext, state: Any) -> bool:
    """When fewer than `aggregation.MIN_SUMMANDS` departments' masked updates have weight, give the strategy the
    replies without an aggregate and return True (the unmask stage is done); otherwise False (unmask as usual).

    SecAgg+ promises that the server learns only the sum of the departments' updates. Departments that declined
    still take part in the protocol, with a zero update of weight 0, so when only one department trained the
    unmasked "sum" would be that department's update, in the clear: it is not unmasked. With none (every department
    declined) Flower's unmask stage would also divide the sum by a total weight of 0. Either way the departments are
    not asked for their shares (the next round's setup makes Flower's `secaggplus_mod` log "Restart from the setup
    stage" at each site, as after a halted round), no aggregate is computed, and the strategy records the round
    (statuses and reasons) and keeps the previous model.
    """
    results = state.legacy_results
    summands = sum(aggregation.weighs_in(res) for _, res in results)
    if summands >= aggregation.MIN_SUMMANDS:
        return False
    log.warning("round %s: %d department update(s) with weight (%d replied): fewer than %d, so their sum is not "
                "unmasked", _current_round(context), summands, len(results), aggregation.MIN_SUMMANDS)
    for _, res in results:  # their masked vectors are not an aggregate: the strategy must not see them as one
        res.parameters = Parameters(tensors=[], tensor_type="")
    context.strategy.aggregate_fit(_current_round(context), results, state.failures)
    return True


def _forget_unmasked_dropouts(state: Any) -> None:
    """After setup and share_keys: only the departments still active take part in masking from now on.

    A department that stops before completing share_keys never sends its key shares, so nobody masks with it
    (`secaggplus_mod` masks only with the neighbours whose shares it received). Flower 1.41 nevertheless keeps it in
    `sampled_node_ids` and in everyone's neighbour set, so the unmask stage asks the survivors for shares they never
    received (each fails with `KeyError: <node id>`) and the round halts, though enough departments remain; it would
    also remove pairwise masks that were never added. Departments that drop after share_keys (their shares are out)
    stay: their masks are reconstructed from the survivors' shares, as the protocol intends.
    """
    active = set(state.active_node_ids)
    state.sampled_node_ids = active
    for node_id, neighbours in state.nid_to_neighbours.items():
        if node_id in active:
            neighbours.intersection_update(active | {node_id})


def skip_completed(workflow: Workflow, completed_rounds: int) -> Workflow:
    """`workflow` for rounds after `completed_rounds`; a no-op for the rounds a resumed run already has."""
    if completed_rounds == 0:
        return workflow

    def run(grid: Grid, context: Context) -> None:
        current = _current_round(context)
        if current <= completed_rounds:
            log.info("round %s: completed before the resume (checkpoint); skipping", current)
            return
        workflow(grid, context)

    return run


def build_workflow(job: JobConfig, strategy: FedSiloStrategy, completed_rounds: int = 0) -> DefaultWorkflow:
    """Flower's default workflow (SecAgg+ for the fit stage when enabled) that starts after `completed_rounds`."""
    fit: Workflow
    if not job.secagg:
        log.warning("build_workflow: SecAgg+ is OFF: the server sees each department's update in the clear.")
        fit = default_fit_workflow
    else:
        fit = ReportingSecAggPlusWorkflow(
            num_shares=job.secagg_num_shares,
            reconstruction_threshold=job.secagg_reconstruction_threshold,
            max_weight=job.secagg_max_weight,
            clipping_range=job.secagg_clipping_range,
            quantization_range=job.secagg_quantization_range,
            modulus_range=SECAGG_MODULUS,
            on_halt=strategy.record_halt,
            on_dropout=strategy.record_dropouts,
            retries=job.round_retries,
        )
    return DefaultWorkflow(fit_workflow=skip_completed(fit, completed_rounds),
                           evaluate_workflow=skip_completed(default_evaluate_workflow, completed_rounds))


def registered_nodes(grid: Any) -> Iterable[Any]:
    """The grid's node information (`Grid.get_nodes`, Flower's NodeInfo: the SuperLink's record of each node, its
    registration name included); a grid without it (before Flower had it) gives the node ids only."""
    get_nodes = getattr(grid, "get_nodes", None)
    if get_nodes is None:
        return [SimpleNamespace(node_id=node_id, name="") for node_id in grid.get_node_ids()]
    return cast(Iterable[Any], get_nodes())


def registered_names(grid: Any) -> dict[int, str]:
    """Node id -> the name each node was registered with (`fedsilo server register --name`, Flower's
    `flwr supernode register --name`), from the grid's node information (`registered_nodes`: the SuperLink's
    `NodeInfo.name` in deployment; simulated nodes have none). Nodes without a name are left out."""
    return {int(node.node_id): str(node.name) for node in registered_nodes(grid) if getattr(node, "name", "")}


def run_workflow(grid: Grid, context: Context, job: JobConfig, strategy: FedSiloStrategy,
                 completed_rounds: int = 0) -> None:
    """Run the job's rounds after `completed_rounds` (0 for a new run, the checkpoint's round when resuming)."""
    strategy.use_registry(lambda: registered_names(grid))
    timed = StageTimeoutGrid(grid, job.stage_timeout)
    strategy.use_error_replies(lambda: timed.error_replies)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=job.num_server_rounds),
                           strategy=strategy)
    build_workflow(job, strategy, completed_rounds)(timed, legacy)

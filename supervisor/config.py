"""The supervisor's configuration: Hydra structured-config schema, validated once at the edge.

The YAML presets in ``conf/`` are composed against these dataclasses, so a misspelled key or a wrong type is
a Hydra error before anything starts. ``validate`` adds the checks types cannot express (ranges, regexes);
``resolve_cluster`` fills in and checks the addresses a Ray mode needs. Mechanisms receive these values; nothing
below the CLI reads the environment for them.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from urllib.parse import urlsplit

from omegaconf import MISSING

from supervisor.outcomes import Action, SupervisorRule
from verl_hooks.contract import DEFAULT_EMERGENCY_SAVE_TIMEOUT_S, DEFAULT_HEARTBEAT_INTERVAL_S, SYNC_PHASES


class VerifyLevel(str, Enum):
    """How hard to look at each ``.pt`` archive.

    ``STRUCTURE`` reads the zip's central directory and its small ``data.pkl`` member (CRC-checked), never the
    tensor payload, so it stays cheap for multi-GB shards; it catches empty, truncated and non-zip files.
    ``CRC`` additionally reads every member and checks its CRC-32, which also catches damage inside tensor data
    (a bit flip, a hole) at the cost of reading the whole checkpoint.
    """

    structure = "structure"
    crc = "crc"


class AuthMode(str, Enum):
    """RAY_AUTH_MODE: how a cluster takes work from its clients (Ray 2.52+)."""

    disabled = "disabled"
    """Anyone who reaches the cluster's ports may submit work: only on a machine or network you alone reach."""
    token = "token"
    """Every client presents the cluster's token."""


class RayMode(str, Enum):
    local = "local"
    """The supervisor starts and owns a local Ray cluster."""
    address = "address"
    """Join an existing cluster; the job's driver runs as the supervisor's child."""
    jobs = "jobs"
    """Submit each attempt through the Ray Jobs API to an existing cluster's dashboard."""


@dataclass
class JobConfig:
    name: str = MISSING
    """A short name for the job: used in the default run directory's name and in the console."""
    argv: list[str] = MISSING
    """The command that runs the job's driver, without a shell; ``{python}`` is this interpreter."""
    args: list[str] = field(default_factory=list)
    """Arguments always passed to the job (the preset's); the user's come after ``--`` on the command line."""
    checkpoint_dir_arg: str | None = "trainer.default_local_dir"
    """The job's override that names its checkpoint directory (set by the supervisor), or null to leave it."""
    resume_args: list[str] = field(
        default_factory=lambda: ["trainer.resume_mode=resume_path", "trainer.resume_from_path={checkpoint}"]
    )
    """Added when resuming; ``{checkpoint}`` becomes the chosen ``global_step_N`` folder."""
    fresh_start_args: list[str] = field(default_factory=lambda: ["trainer.resume_mode=disable"])
    """Added when there is no checkpoint to resume from."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for the job (add them with ``+job.env.NAME=value``)."""
    cwd: str | None = None
    """The job's working directory; null means the supervisor's."""
    log_limit_mb: float | None = 200.0
    """Each of an attempt's logs (``stdout.log``, ``stderr.log``) is kept under this many MB: its first quarter
    and its newest part (``stdout.log.tail``, ``.tail.1``), what falls between dropped. null: unbounded."""


@dataclass
class RayConfig:
    mode: RayMode = RayMode.local
    """``local``: the supervisor starts and owns a Ray cluster on this machine; ``address``: the job's driver runs
    here against an existing cluster; ``jobs``: each attempt is submitted through that cluster's Jobs API."""
    address: str | None = None
    """``ray.mode=address``: the cluster's GCS address (host:port); ``ray.mode=jobs``: the dashboard's URL
    (http://host:8265). Null: $RAY_ADDRESS."""
    dashboard_url: str | None = None
    """``ray.mode=address``: the dashboard whose state API the fence asks (null: port 8265 on the GCS host)."""
    gcs_address: str | None = None
    """``ray.mode=jobs``: the GCS the fence kills stray actors through (null: port 6379 on the dashboard host)."""
    python: str = "python"
    """``ray.mode=jobs``: the interpreter that ``{python}`` in job.argv means where the cluster runs drivers."""
    ship_verl_hooks: bool = False
    """``ray.mode=jobs``: send this machine's verl_hooks to the cluster with each job (runtime_env py_modules)."""
    num_cpus: int | None = None
    """Logical CPUs of the embedded cluster; null lets Ray count the machine's."""
    num_gpus: int | None = None
    """Logical GPUs of the embedded cluster (``ray start --num-gpus``); null lets Ray count the machine's."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom logical resources of the embedded cluster (``ray start --resources``), e.g. ``+ray.resources.x=1``."""
    object_store_memory_mb: int | None = None
    """The embedded cluster's object store, in MB (null: Ray's own share of the machine's memory)."""
    auth_mode: AuthMode | None = None
    """RAY_AUTH_MODE of the cluster, the job and the supervisor's own calls to it (``disabled`` or ``token``).
    Null: ``token`` for the embedded cluster (closed by default); for the cluster modes $RAY_AUTH_MODE, else
    ``disabled``."""
    auth_token_path: str | None = None
    """The file holding the cluster's token (``token`` mode). Null: the embedded cluster gets a token drawn for
    the run in ``<run_dir>/ray_auth_token`` (mode 0600); the cluster modes use $RAY_AUTH_TOKEN_PATH, else Ray's
    own lookup ($RAY_AUTH_TOKEN, ~/.ray/auth_token)."""
    dashboard: bool = True
    """The embedded cluster's dashboard, on loopback: the fence asks its state API for the job's actors."""
    keep_cluster_between_attempts: bool = True
    """Reuse the embedded cluster while it is healthy; false starts a fresh one for every attempt."""
    start_timeout_s: float = 120.0
    """How long the embedded cluster (and each extra node of a test cluster) may take to come up."""
    api_timeout_s: float = 10.0
    """Bound on each call to the cluster's state API, Jobs API and GCS (the fence retries until its deadline)."""


@dataclass
class RestartConfig:
    max_restarts: int = 3
    """Restarts allowed over the whole run, across supervisor restarts on the same run directory."""
    backoff_initial_s: float = 1.0
    """The wait before the first restart after a failure without progress; each further one multiplies it."""
    backoff_max_s: float = 60.0
    """The longest wait between two attempts, jitter included."""
    backoff_multiplier: float = 2.0
    """Each failure in a row without progress multiplies the wait by this."""
    backoff_jitter_s: float = 1.0
    """A random wait of up to this much is added, so that runs restarted together do not start together."""
    max_failures_without_progress: int = 3
    """This many failed attempts in a row without the checkpoint step advancing is a crash loop: stop."""
    stop_on_repeated_failure: bool = True
    """Stop (exit 3) when an attempt that resumed from where the previous one left off fails like it: the same
    error type, phase and message (numbers and ids aside) at the same global step. A restart would run the same
    steps into the same failure (``supervisor/policy/repeats.py``)."""
    warm_standby: bool = True
    """Once an attempt has finished its first weight sync, start the next attempt's driver ahead (``python -m
    verl_hooks.standby``): it imports the launcher and what the job's module imports, then waits, connected to
    nothing, and a relaunch hands it its command line instead of starting a cold driver. ``ray.mode=local`` and
    ``address``, for a job run through ``verl_hooks.launch -m MODULE``."""
    backoff_after_progress: bool = False
    """False: an attempt that advanced the checkpoint step is restarted at once (waiting would only lose time: the
    failure is not repeating); the exponential backoff applies to failures that repeat without progress."""
    emergency_save: bool = True
    """When a weight sync fails and every trainer task of it has finished, the trainer saves the step it is at
    through verl's own ``_save_checkpoint`` before the job ends, so the relaunch redoes nothing
    (``verl_hooks.emergency``; verl's V1 and legacy trainers)."""
    emergency_save_timeout_s: float = DEFAULT_EMERGENCY_SAVE_TIMEOUT_S
    """The emergency save's deadline while the job has timed none of its own periodic saves; once it has, 3x the
    slowest of them (at least 60 s), never above this. Past it the job gives up on the save and ends."""
    save_on_stop_s: float = 0.0
    """On SIGTERM (a preemption, ``sbatch --signal``, a pod eviction): ask the job to save at its next safe point
    (right after its next successful weight sync) and wait at most this long before tearing it down. 0: tear down
    at once. Set it below the platform's grace period (a pod's terminationGracePeriodSeconds, Slurm's KillWait or
    --signal lead time) less ``teardown.grace_s``; it pays when a step plus a save fit in it."""


@dataclass
class TeardownConfig:
    grace_s: float = 10.0
    """Between SIGTERM and SIGKILL, for the job's process group and for every process of the attempt."""
    fence_timeout_s: float = 60.0
    """How long to wait for the attempt's processes and Ray actors to be gone before refusing to relaunch."""
    kill_stray_actors: bool = True
    """Kill (by id, through the GCS) actors of the attempt's Ray job that outlive its driver: detached ones.
    Off: they are waited for until ``fence_timeout_s``, then the supervisor stops (exit code 6)."""
    remove_stray_placement_groups: bool = True
    """Remove (by id) placement groups of the attempt's Ray job that outlive its driver (detached ones): they keep
    their bundles' GPUs reserved and the next attempt's workers would wait for them forever."""
    wait_for_resources: bool = True
    """Before a relaunch, wait (within ``fence_timeout_s``) until the cluster's GPUs and custom resources are as
    available as before the attempt. Off for a cluster whose other jobs take GPUs while the run is torn down."""
    sweep_nodes: bool = True
    """``ray.mode=address`` or ``jobs``: after the attempt, a Ray task pinned to each of its nodes ends the
    attempt's processes there that no actor of the state API accounts for (the engine workers a rollout server
    starts), and waits until none of them holds GPU memory on that node (NVML)."""
    straggler_grace_s: float = 2.0
    """Between SIGTERM and SIGKILL for a process of the attempt that the fence finds after the first sweep (it
    appeared late, or outlived its group): capped by ``grace_s``."""
    reap_timeout_s: float = 5.0
    """After SIGKILL, how long to wait for the kernel to reap a process before reporting it as a survivor."""
    jobs_stop_timeout_s: float = 10.0
    """``ray.mode=jobs``: past ``grace_s``, how long Ray may take to stop a submission (``stop_job`` waits its own
    ``RAY_JOB_STOP_WAIT_TIME_S`` before SIGKILL) before the fence fails."""
    record_grace_s: float = 2.0
    """Once the job's error record has arrived (the launcher posts it before its driver exits), how long the driver
    may take to exit by itself before the attempt is torn down: a driver with rollout engines can take tens of
    seconds to die, and the failure is already known."""
    output_drain_s: float = 5.0
    """How long the attempt's output may take to reach its log files after its processes are gone."""


@dataclass
class CheckpointConfig:
    dir: str = "${run_dir}/checkpoints"
    """Where the job writes its ``global_step_N`` folders (its trainer.default_local_dir)."""
    verify: VerifyLevel = VerifyLevel.structure
    """``structure``: archives readable and complete in shape; ``crc``: also read every byte (slow for big models)."""
    verify_resume: bool = True
    """Stop a relaunched attempt at once (exit 8) when its weight syncs show it did not resume from the chosen
    step. Turn off for verl's fully-async trainer, which numbers its syncs by parameter version."""
    rotate: bool = True
    """Apply the job's own ``trainer.max_actor_ckpt_to_keep`` / ``max_critic_ckpt_to_keep`` across attempts
    (verl applies them only within one process); without those limits nothing is ever removed."""


@dataclass
class WatchdogConfig:
    """Stall detection from heartbeats (see supervisor/policy/watchdog.py). Times in seconds."""

    enabled: bool = True
    """Stall detection, for jobs launched through ``verl_hooks.launch`` (their heartbeats)."""
    startup_timeout_s: float = 3600.0
    """Allowance before the first completed weight sync: model loading, the first rollout."""
    step_timeout_s: float = 3600.0
    """After it: no progress heartbeat for this long is a stall (an upper bound when adaptive)."""
    adaptive: bool = True
    """Once ``adaptive_min_steps`` steps are seen, the limit is ``adaptive_multiple`` x the slowest recent step."""
    adaptive_multiple: float = 5.0
    """The adaptive limit: this many times the slowest recent step."""
    adaptive_floor_s: float = 600.0
    """The adaptive limit is never below this. A hang inside a weight sync ends at whichever comes first, this
    limit or the guard's own deadline (``VERL_HOOKS_SYNC_TIMEOUT_S``): both name the phase."""
    adaptive_min_steps: int = 3
    """Timed steps needed before the adaptive limit replaces ``step_timeout_s``."""
    driver_timeout_s: float = 60.0
    """No alive heartbeat from the driver for this long: the driver process is frozen."""
    heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S
    """How often the driver sends its alive heartbeat."""
    tick_s: float = 1.0
    """How often the supervisor looks at the heartbeats while the job runs (detection granularity)."""
    stack_dump_timeout_s: float = 3.0
    """How long to wait for the stalled job's processes to dump their stacks before tearing them down."""
    listen_host: str | None = None
    """Where the heartbeat server listens. Null: 127.0.0.1 with ``ray.mode=local``; with a cluster, this
    machine's address on the route to it, so that the job's processes on other nodes reach the server."""
    advertise_host: str | None = None
    """The host name the job is told to send heartbeats to (null: listen_host)."""


@dataclass
class RuleConfig:
    """One classification rule: every criterion given must match; the first rule that matches decides."""

    name: str = MISSING
    """Recorded as the attempt's ``rule``; unique, and not one of the supervisor's own verdicts."""
    action: Action = MISSING
    """``restart``, ``fail`` (stop with exit 3) or ``done`` (stop with exit 0)."""
    exit_codes: list[int] | None = None
    """The driver's exit codes it matches."""
    signals: list[str] | None = None
    """Signal names (SIGKILL) or "any" for a job killed by any signal."""
    error_type: str | None = None
    """Regex searched in the error record's error type."""
    phases: list[str] | None = None
    """Weight-sync phases from the error record (``verl_hooks.phases``: ``abort``, ``update_weights``, ...)."""
    log_regex: str | None = None
    """Regex searched in the end of the attempt's output (stdout and stderr)."""
    stalled: bool | None = None
    """True: the watchdog ended the attempt for making no progress; false: it ended by itself."""


@dataclass
class MetricsConfig:
    port: int | None = None
    """Serve Prometheus metrics at http://host:port/metrics (null: off; 0: a free port, named in an event)."""
    host: str = "127.0.0.1"
    """Where the metrics listen: loopback by default; ``0.0.0.0`` (or the pod's address) for a PodMonitor."""


@dataclass
class NotifyConfig:
    webhook_url: str | None = None
    """A Slack-compatible incoming webhook (http or https), POSTed on each restart, a give-up and the end. A
    secret: never logged."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra HTTP headers (e.g. ``+notify.headers.Authorization=...``); secrets too, never logged."""
    timeout_s: float = 5.0
    """Per POST; the last alert of a run may delay the supervisor's exit by at most twice this."""


@dataclass
class NodesConfig:
    exclude: bool = True
    """After a failed attempt, drain in Ray (as ``ray drain-node`` does) each node it used that the probe found
    unhealthy (a GPU unreachable, uncorrectable ECC errors, pages pending retirement, a row-remapping failure,
    hardware slowdown, a failed compute check) or that was the place of the failure on two attempts in a row,
    never the head; stop (exit 9) when the nodes left cannot hold what the job reserved, or when the one machine
    of an embedded cluster has an unhealthy GPU. Off: the health is still read and reported, nothing is drained
    or stopped for it."""


@dataclass
class PreemptionConfig:
    """Worker-node preemption notices: Ray draining a node that holds the attempt's actors or placement groups
    (the autoscaler, KubeRay or a spot-termination handler calling Ray's ``DrainNode``; ``ray drain-node``)."""

    watch: bool = True
    """While an attempt runs on a cluster of several machines, read which nodes Ray is draining every
    ``poll_s``; a drain of one of the attempt's nodes that the supervisor did not ask for asks the job to save
    the step it is at (as ``restart.save_on_stop_s`` does), ends the attempt as a stop (not counted against
    ``restart.max_restarts``) and relaunches it on the nodes that remain. Off: a preempted node is a failure like
    any other, found when the node dies."""
    poll_s: float = 2.0
    """How often the draining nodes are read (one small GCS call)."""
    margin_s: float = 10.0
    """The job's save must end this long before the drain's deadline: the attempt is torn down then, while its
    processes can still be stopped cleanly."""
    wait_without_deadline_s: float = 120.0
    """How long the save is waited for when the drain gives no deadline."""
    replacement_wait_s: float = 300.0
    """After a preemption, when the nodes left cannot hold what the job reserved: how long to wait for a node to
    join (or come back) before stopping with exit 9. 0: stop at once."""


@dataclass
class SupervisorConfig:
    run_dir: str = MISSING
    """Where everything of the run lives (state.json, events.jsonl, the attempts' logs, the embedded cluster's
    temp dir, by default the checkpoints). ``conf/supervisor.yaml``: ``runs/<time>-<job>``. Starting the
    supervisor again on the same directory continues the run."""
    job: JobConfig = field(default_factory=JobConfig)
    """The job: picked as a preset (``job=verl_ppo``, ``job=mini_ppo``, or one of yours with ``--config-dir``)."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Which Ray cluster the job runs on, and how the supervisor reaches it."""
    restart: RestartConfig = field(default_factory=RestartConfig)
    """When a failed attempt is restarted, and what the job saves before it ends."""
    teardown: TeardownConfig = field(default_factory=TeardownConfig)
    """How an attempt is ended and proven gone before the next one starts."""
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Where the job's checkpoints are, and how they are judged before a resume."""
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    """Stall detection from the job's heartbeats."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Prometheus metrics of the run."""
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    """A webhook alerted on each restart, a give-up and the end."""
    nodes: NodesConfig = field(default_factory=NodesConfig)
    """Node health after a failed attempt, and draining the nodes a relaunch must not use."""
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    """Saving and relaunching elsewhere when Ray drains one of the attempt's nodes (a preemption notice)."""
    extra_rules: list[RuleConfig] = field(default_factory=list)
    """Rules of your own, matched before ``rules`` (the built-in ones in conf/supervisor.yaml), which they keep:
    add one on the command line with ``'extra_rules=[{name: x, action: fail, exit_codes: [3]}]'`` or in a job
    preset. Setting ``rules`` instead replaces every built-in rule."""
    rules: list[RuleConfig] = field(default_factory=list)
    """The built-in classification rules (``conf/supervisor.yaml``), ordered, the first match deciding. Setting
    ``rules`` replaces all of them; ``extra_rules`` adds yours in front."""
    default_action: Action = Action.restart
    """For an ended attempt no rule matches: a crash the restart budget and the crash-loop guard bound. (A driver
    that exited 0 with no error record is done whatever this says.)"""
    log_tail_bytes: int = 65536
    """How much of the end of an attempt's output the ``log_regex`` rules search."""


def ordered_rules(config: SupervisorConfig) -> list[RuleConfig]:
    """The classification rules in the order they are matched: the user's ``extra_rules``, then ``rules``."""
    return [*config.extra_rules, *config.rules]


def validate(config: SupervisorConfig) -> list[str]:
    """Problems the schema's types cannot catch; each a one-line message naming the key."""
    problems = []

    def require(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    require(bool(config.job.argv), "job.argv must name the command that runs the job")
    require(config.restart.max_restarts >= 0, "restart.max_restarts must be >= 0")
    require(config.restart.max_failures_without_progress >= 1, "restart.max_failures_without_progress must be >= 1")
    require(config.restart.backoff_initial_s >= 0, "restart.backoff_initial_s must be >= 0")
    require(
        config.restart.backoff_max_s >= config.restart.backoff_initial_s, "restart.backoff_max_s < backoff_initial_s"
    )
    require(config.restart.backoff_multiplier >= 1, "restart.backoff_multiplier must be >= 1")
    require(config.restart.backoff_jitter_s >= 0, "restart.backoff_jitter_s must be >= 0")
    require(config.restart.emergency_save_timeout_s > 0, "restart.emergency_save_timeout_s must be > 0")
    require(config.restart.save_on_stop_s >= 0, "restart.save_on_stop_s must be >= 0")
    preemption = config.preemption
    require(preemption.poll_s > 0, "preemption.poll_s must be > 0")
    for key in ("margin_s", "wait_without_deadline_s", "replacement_wait_s"):
        require(getattr(preemption, key) >= 0, f"preemption.{key} must be >= 0")
    require(config.teardown.grace_s >= 0, "teardown.grace_s must be >= 0")
    require(config.teardown.fence_timeout_s > 0, "teardown.fence_timeout_s must be > 0")
    for key in ("straggler_grace_s", "reap_timeout_s", "jobs_stop_timeout_s", "output_drain_s", "record_grace_s"):
        require(getattr(config.teardown, key) >= 0, f"teardown.{key} must be >= 0")
    require(config.ray.start_timeout_s > 0, "ray.start_timeout_s must be > 0")
    require(config.ray.api_timeout_s > 0, "ray.api_timeout_s must be > 0")
    require(config.ray.num_cpus is None or config.ray.num_cpus > 0, "ray.num_cpus must be > 0")
    require(config.ray.num_gpus is None or config.ray.num_gpus >= 0, "ray.num_gpus must be >= 0")
    require(all(v >= 0 for v in config.ray.resources.values()), "ray.resources values must be >= 0")
    require(config.log_tail_bytes > 0, "log_tail_bytes must be > 0")
    require(config.job.log_limit_mb is None or config.job.log_limit_mb > 0, "job.log_limit_mb must be > 0 or null")
    dog = config.watchdog
    for key in ("startup_timeout_s", "step_timeout_s", "adaptive_floor_s", "driver_timeout_s", "tick_s"):
        require(getattr(dog, key) > 0, f"watchdog.{key} must be > 0")
    require(dog.adaptive_multiple >= 1, "watchdog.adaptive_multiple must be >= 1")
    require(dog.adaptive_min_steps >= 1, "watchdog.adaptive_min_steps must be >= 1")
    require(dog.heartbeat_interval_s < dog.driver_timeout_s, "watchdog.heartbeat_interval_s < driver_timeout_s")
    require(dog.stack_dump_timeout_s >= 0, "watchdog.stack_dump_timeout_s must be >= 0")
    port = config.metrics.port
    require(port is None or 0 <= port <= 65535, "metrics.port must be between 0 and 65535 (or null: off)")
    url = config.notify.webhook_url
    # The URL is a secret: the message names the key, never the value.
    require(url is None or urlsplit(url).scheme in ("http", "https"), "notify.webhook_url must be an http(s) URL")
    require(config.notify.timeout_s > 0, "notify.timeout_s must be > 0")
    for arg in config.job.resume_args:
        if "{checkpoint}" in arg:
            break
    else:
        require(not config.job.resume_args, "job.resume_args must contain {checkpoint}")
    seen_names: set[str] = set()
    for key, index, rule in [
        *(("extra_rules", i, r) for i, r in enumerate(config.extra_rules)),
        *(("rules", i, r) for i, r in enumerate(config.rules)),
    ]:
        where = f"{key}[{index}] ({rule.name})"
        require(rule.name not in seen_names, f"{where}: another rule has the name {rule.name!r}; names must be unique")
        seen_names.add(rule.name)
        for phase in rule.phases or []:
            require(
                phase in SYNC_PHASES,
                f"{where}.phases: {phase!r} is not a weight-sync phase (one of {', '.join(SYNC_PHASES)})",
            )
        require(
            rule.name not in SupervisorRule._value2member_map_,
            f"{where}: the name {rule.name!r} is the supervisor's own verdict; rules may not take "
            f"{', '.join(v.value for v in SupervisorRule)}",
        )
        criteria = (rule.exit_codes, rule.signals, rule.error_type, rule.phases, rule.log_regex, rule.stalled)
        require(any(c is not None for c in criteria), f"{where} has no criterion and would match everything")
        for key in ("error_type", "log_regex"):
            pattern = getattr(rule, key)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    problems.append(f"{where}.{key} is not a valid regex: {exc}")
        for name in rule.signals or []:
            require(name == "any" or name.startswith("SIG"), f"{where}.signals: {name!r} is not a signal name")
    return problems


RUN_TOKEN_FILE = "ray_auth_token"
"""The embedded cluster's token, drawn for the run, in the run directory (mode 0600)."""

RAY_DEFAULT_DASHBOARD_PORT = 8265
RAY_DEFAULT_GCS_PORT = 6379


def host_of(address: str) -> str:
    """The host of ``host:port`` or of a URL."""
    return urlsplit(address if "://" in address else f"//{address}").hostname or ""


TOKEN_AUTH_SINCE = (2, 52)
"""The first Ray whose clusters take ``RAY_AUTH_MODE=token``: an older one ignores the variable and is open."""


def token_auth_problem(auth_mode: AuthMode | None, ray_version: str) -> str | None:
    """Token auth asked of a Ray that has none would be a lie: a cluster open while the supervisor says it is
    closed. The one line that says so, and what to choose instead; None when there is no lie."""
    if auth_mode is not AuthMode.token:
        return None
    release = tuple(int(part) for part in re.findall(r"\d+", ray_version)[:2])
    if release >= TOKEN_AUTH_SINCE:
        return None
    since = ".".join(map(str, TOKEN_AUTH_SINCE))
    return (
        f"ray.auth_mode=token needs Ray {since} or newer; Ray {ray_version} has no token authentication and its "
        f"cluster would take work from anyone who reaches it: set ray.auth_mode=disabled (on a machine only you "
        f"can reach), or install a newer Ray"
    )


def auth_mode_of(ray: RayConfig) -> AuthMode:
    """The cluster's auth mode as ``resolve_cluster`` settled it; a configuration built in code and never resolved
    (tests, scripts) has ``disabled``, the Ray default."""
    return ray.auth_mode or AuthMode.disabled


def resolve_cluster(config: SupervisorConfig, environ: Mapping[str, str], ray_version: str | None = None) -> list[str]:
    """Fill in the cluster addresses a mode needs (from $RAY_ADDRESS and Ray's default ports); returns the
    problems, one line each. Resolved here, once: the backends get values, not environment lookups.
    ``ray_version``: the installed Ray's (None: read from its package metadata, without importing it)."""
    ray = config.ray
    version = ray_version or importlib.metadata.version("ray")
    if ray.mode is RayMode.local:
        ray.auth_mode = ray.auth_mode or AuthMode.token
        if ray.auth_mode is AuthMode.token and ray.auth_token_path is None:
            ray.auth_token_path = f"{config.run_dir}/{RUN_TOKEN_FILE}"
        problem = token_auth_problem(ray.auth_mode, version)
        return [problem] if problem else []
    if ray.auth_mode is None:
        from_env = environ.get("RAY_AUTH_MODE") or AuthMode.disabled.value
        if from_env not in AuthMode._value2member_map_:
            return [f"RAY_AUTH_MODE must be disabled or token, not {from_env!r}"]
        ray.auth_mode = AuthMode(from_env)
    if ray.auth_mode is AuthMode.token and ray.auth_token_path is None:
        ray.auth_token_path = environ.get("RAY_AUTH_TOKEN_PATH") or None
    problem = token_auth_problem(ray.auth_mode, version)
    if problem:
        return [problem]
    if ray.address is None:
        ray.address = environ.get("RAY_ADDRESS") or None
    address = ray.address or ""
    if ray.mode is RayMode.address:
        if not address or "://" in address or ":" not in address:
            return [f"ray.mode=address needs ray.address=HOST:PORT (the cluster's GCS) or RAY_ADDRESS, not {address!r}"]
        ray.dashboard_url = ray.dashboard_url or f"http://{host_of(address)}:{RAY_DEFAULT_DASHBOARD_PORT}"
    else:
        if not address.startswith(("http://", "https://")):
            return [f"ray.mode=jobs needs ray.address=http://HOST:8265 (the dashboard) or RAY_ADDRESS, not {address!r}"]
        ray.gcs_address = ray.gcs_address or f"{host_of(address)}:{RAY_DEFAULT_GCS_PORT}"
    return []

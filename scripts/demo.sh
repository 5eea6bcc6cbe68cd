#!/usr/bin/env bash
# The supervisor on the CPU mini-PPO job, with a weight-sync failure injected on attempt 1: watch the typed
# failure (exit 75), the trainer's emergency save of the step it failed at (saves are due every 2 steps: step 3
# is saved only because the sync failed), the teardown and fence, the resume from that step, and the finished run.
# Extra arguments are supervisor overrides (e.g. `scripts/demo.sh restart.max_restarts=1`); another fault:
# `VERL_HOOKS_FAULTS='finalize:hang@3#1' VERL_HOOKS_SYNC_TIMEOUT_S=10 scripts/demo.sh`.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo_root/scripts/setup_venv.sh"
cd "$repo_root"

run_dir="${RUN_DIR:-$repo_root/runs/demo-$(date +%Y%m%d-%H%M%S)}"
echo "demo: supervising the mini-PPO job in $run_dir, with VERL_HOOKS_FAULTS=${VERL_HOOKS_FAULTS-update_weights:raise@3#1}"

# The job inherits the supervisor's environment; VERL_HOOKS_FAULTS=PHASE:ACTION@STEP#ATTEMPT fires once.
export VERL_HOOKS_FAULTS="${VERL_HOOKS_FAULTS-update_weights:raise@3#1}"
set +e
.venv/bin/verl-supervisor \
    run_dir="$run_dir" \
    restart.backoff_initial_s=0.5 \
    "$@" \
    -- trainer.total_training_steps=6 trainer.save_freq=2 rollout.backend=cpu_gloo
code=$?
set -e

echo
if [ -f "$run_dir/state.json" ]; then
    .venv/bin/verl-supervisor status "$run_dir"
fi
echo
echo "demo: the supervisor exited with code $code"
echo "demo: events         $run_dir/events.jsonl"
echo "demo: attempt logs   $run_dir/attempts/<n>/{stdout,stderr}.log, error record in attempts/1/error.json"
echo "demo: final weights  $run_dir/checkpoints/final.json"
echo "demo: a report       .venv/bin/verl-supervisor report $run_dir   (report.md and timeline.png)"
exit "$code"

"""Wire keys, metric names and statuses: the one place where these strings are spelled."""

from typing import Final

# Fit/evaluate config keys sent by the server (FitIns/EvaluateIns config).
CFG_ROUND: Final = "server-round"
CFG_NUM_ROUNDS: Final = "num-server-rounds"
CFG_MODEL_FINGERPRINT: Final = "model-fingerprint"
# The job's identity across resumes (the run config's `job-id`), which sites key their per-job epsilon cap on.
# Absent (a server from before job ids): the department uses the Flower run id instead.
CFG_JOB_ID: Final = "job-id"

# Metric keys sent back by a department (aggregate values only; never per-example data).
M_DEPARTMENT: Final = "department"
M_STATUS: Final = "status"
M_EPSILON: Final = "epsilon"
M_DELTA: Final = "delta"
M_NOISE: Final = "noise-multiplier"
M_STEPS: Final = "steps"
M_TRAIN_LOSS: Final = "train-loss"
M_TRAIN_SECONDS: Final = "train-seconds"
M_LOSS: Final = "loss"
M_ACCURACY: Final = "accuracy"
M_CORRECT: Final = "correct"
M_NUM_EXAMPLES: Final = "num-examples"
M_REASON: Final = "reason"
M_PHASE: Final = "phase"  # "probe" (the head alone, on cached inputs) or "finetune" (client.plan)
M_PLAN: Final = "plan"  # the department's privacy-utility plan for the rest of the job, as JSON (client.plan.Plan)

# Department statuses recorded per round by the server.
STATUS_TRAINED: Final = "trained"
STATUS_DECLINED_BUDGET: Final = "declined_budget"
STATUS_DECLINED_POLICY: Final = "declined_policy"
STATUS_FAILED: Final = "failed"
STATUS_NOT_SEEN: Final = "not_seen"
STATUS_DROPPED: Final = "dropped"  # sampled, but stopped answering before its update was aggregated

# Node-config keys (simulation sets partition-id/num-partitions; deployment sets site-config).
NODE_PARTITION_ID: Final = "partition-id"
NODE_NUM_PARTITIONS: Final = "num-partitions"
NODE_SITE_CONFIG: Final = "site-config"

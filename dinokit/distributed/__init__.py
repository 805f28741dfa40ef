"""Multi-process training: process-group setup from torchrun's environment (`env`) and the one
place that applies DDP or FSDP2 to the SSL model (`parallelize`)."""

from dinokit.distributed.env import DistEnv, distributed_env, reduce_sum
from dinokit.distributed.parallelize import DTYPES, parallelize

__all__ = ["DTYPES", "DistEnv", "distributed_env", "parallelize", "reduce_sum"]

"""Expert parallelism combined with data parallelism, over torch.distributed.

    env.py          who am I: rank, world size and rendezvous from torchrun, mpirun (Open MPI, MPICH) or srun
    startup.py      init_distributed(config) -> ParallelContext, shutdown()
    agree.py        every rank checks all were started with the same config, before anything else
    groups.py       the ep x edp layout: ep groups [0,1][2,3] split experts, edp groups [0,2][1,3] replicate them
    collectives.py  collectives that name themselves in errors; autograd all-to-all, all-gather, reduce-scatter
    dispatch.py     AllToAllDispatcher and AllGatherDispatcher, swappable with the model's LocalDispatcher
                    (all-to-all ones overlap the exchange with the shared experts, and in chunks with the experts)
    dedup_dispatch.py  DedupAllToAllDispatcher: sends a token to a rank once, not once per expert there
    parallelize.py  shard each MoE layer's experts, install its dispatcher, synchronise replicas
    grads.py        average gradients (dense over the world, experts over edp / world), global grad norm, clip
    fsdp.py         parallel.fsdp: FSDP2 shards dense state over the world and experts over their edp group

Model code never imports torch.distributed: it only calls the dispatcher it is handed.
"""

from mymoe.parallel.agree import ConfigMismatchError, agree_on_config
from mymoe.parallel.collectives import CollectiveError
from mymoe.parallel.dedup_dispatch import DedupAllToAllDispatcher
from mymoe.parallel.dispatch import AllGatherDispatcher, AllToAllDispatcher
from mymoe.parallel.env import LaunchInfo, detect_launch
from mymoe.parallel.grads import clip_grad_norm_, global_grad_norm, reduce_gradients
from mymoe.parallel.groups import ParallelContext, build_context
from mymoe.parallel.parallelize import parallelize
from mymoe.parallel.startup import init_distributed, shutdown

__all__ = [
    "AllGatherDispatcher",
    "AllToAllDispatcher",
    "CollectiveError",
    "ConfigMismatchError",
    "DedupAllToAllDispatcher",
    "LaunchInfo",
    "ParallelContext",
    "agree_on_config",
    "build_context",
    "clip_grad_norm_",
    "detect_launch",
    "global_grad_norm",
    "init_distributed",
    "parallelize",
    "reduce_gradients",
    "shutdown",
]

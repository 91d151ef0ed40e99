"""Restores save_sharded.py's checkpoint with another layout: run it as 4 processes x 1 device.

    python -m nnx_ckpt_widgets.launch --num-processes 4 --devices-per-process 1 \\
        notebooks/scripts/restore_sharded.py OUTDIR

OUTDIR is the folder (or gs:// URL) given to save_sharded.py; the checkpoint is OUTDIR/state.
"""

import sys

import jax
import orbax.checkpoint as ocp
from flax import nnx
from sharded_mlp import DIM, RESTORE_AXES, TwoLayerMLP, checkpoint_path, checksums, describe_shards

from nnx_ckpt_widgets.launch import initialize

initialize()  # connect the processes: before any JAX computation

path = checkpoint_path(sys.argv[1])
mesh = jax.make_mesh((4,), ("model",))
# The target: shapes, dtypes and the new shardings, computed without creating any array.
graphdef, abstract_state = nnx.get_abstract_model(
    lambda: TwoLayerMLP(DIM, RESTORE_AXES, rngs=nnx.Rngs(0)), mesh
)
# Every process calls restore: each reads only the blocks its devices need.
with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(path, abstract_state)
model = nnx.merge(graphdef, state)

print(f"process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} device")
for line in describe_shards(nnx.state(model)):
    print(line)

sums = checksums(nnx.state(model))  # collective: every process takes part
if jax.process_index() == 0:
    for name, digest in sums.items():
        print(f"restored {name} sha256 {digest}")

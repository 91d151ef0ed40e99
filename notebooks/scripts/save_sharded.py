"""Saves a sharded TwoLayerMLP from every process: run it as 2 processes x 2 CPU devices.

    python -m nnx_ckpt_widgets.launch --num-processes 2 --devices-per-process 2 \\
        notebooks/scripts/save_sharded.py OUTDIR

The checkpoint goes to OUTDIR/state; OUTDIR may be a local folder or a bucket, gs://BUCKET/DIR.
If that exists, the script stops before touching it, unless --force is given: then Orbax
deletes it and saves anew. Under a cluster's launcher (mpirun, srun) it runs unchanged.
"""

import argparse
import sys

import jax
import orbax.checkpoint as ocp
from flax import nnx
from sharded_mlp import DIM, SAVE_AXES, TwoLayerMLP, checkpoint_path, checksums, describe_shards

from nnx_ckpt_widgets.launch import initialize

parser = argparse.ArgumentParser(description="Save a sharded TwoLayerMLP to OUTDIR/state.")
parser.add_argument("outdir")
parser.add_argument("--force", action="store_true", help="replace an existing OUTDIR/state")
args = parser.parse_args()
path = checkpoint_path(args.outdir)
if path.exists() and not args.force:  # every process checks, before any of them saves
    sys.exit(f"error: {path} already exists; pass --force to replace it.")

initialize()  # connect the processes: before any JAX computation

# One mesh over the devices of all processes: jax.devices() is global after initialize().
mesh = jax.make_mesh((2, 2), ("data", "model"))
with jax.set_mesh(mesh):
    # Under a mesh, each annotated kernel is created already split over the devices.
    model = TwoLayerMLP(DIM, SAVE_AXES, rngs=nnx.Rngs(0))
state = nnx.state(model)

print(f"process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} devices")
for line in describe_shards(state):
    print(line)

# Every process calls save: each writes the blocks it holds, process 0 also the metadata.
checkpointer = ocp.StandardCheckpointer()
checkpointer.save(path, state, force=args.force)
checkpointer.wait_until_finished()

sums = checksums(state)  # collective: every process takes part
if jax.process_index() == 0:
    for name, digest in sums.items():
        print(f"saved {name} sha256 {digest}")

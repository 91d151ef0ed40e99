# Copyright 2026 The JAX Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     https://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
# Changed for nnx-ckpt-widgets' tests (Apache-2.0, section 4(b)): see ../README.md.

import re

import jax
import jax.numpy as jnp
import logging
from typing import Any, TypeAlias

ModelType: TypeAlias = Any
ModelConfigType: TypeAlias = Any
TransformValueType: TypeAlias = None | tuple[tuple[int, ...], tuple[int, ...] | None, bool]
TransformType: TypeAlias = Any  # Enum with values of type TransformValueType
KeyMapType: TypeAlias = tuple[str, TransformType]


def map_to_bonsai_key(mapping: dict[str, KeyMapType], source_key: str) -> KeyMapType | tuple[None, None]:
    """Map a safetensors key to exactly one JAX key & transform, else warn/error."""
    subs = [
        (re.sub(pat, repl, source_key), transform)
        for pat, (repl, transform) in mapping.items()
        if re.match(pat, source_key)
    ]
    if not subs:
        logging.warning(f"No mapping found for key: {source_key!r}")
        return None, None
    if len(subs) > 1:
        keys = [s for s, _ in subs]
        raise ValueError(f"Multiple mappings found for {source_key!r}: {keys}")
    return subs[0]


def stoi(s: str) -> int | str:
    """Convert a string to an int if possible, otherwise return the string."""
    try:
        return int(s)
    except ValueError:
        return s


def assign_weights_from_eval_shape(
    keys: list[str], tensor: jnp.ndarray, state_dict: dict, st_key: str, transform: TransformType
):
    """Recursively descend into state_dict and assign the (possibly permuted/reshaped) tensor.
    Assumes that the state_dict values are of type ShapeDtypeStruct.
    """
    key, *rest = keys
    if not rest:
        if transform is not None:
            permute, reshape, reshape_first = transform
            if reshape_first and reshape is not None:
                tensor = tensor.reshape(reshape)
            if permute:
                tensor = tensor.transpose(permute)
            if not reshape_first and reshape is not None:
                tensor = tensor.reshape(reshape)
        if tensor.shape != state_dict[key].shape:
            raise ValueError(f"Shape mismatch for {st_key}: {tensor.shape} vs {state_dict[key].shape}")

        tensor = tensor.astype(state_dict[key].dtype)
        if hasattr(state_dict[key], "sharding") and state_dict[key].sharding is not None:
            tensor = jax.device_put(tensor, state_dict[key].sharding.spec)
        state_dict[key] = tensor
    else:
        assign_weights_from_eval_shape(rest, tensor, state_dict[key], st_key, transform)

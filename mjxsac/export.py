"""``mjxsac-export``: a checkpoint's deterministic policy as an ONNX model, or its raw
weights as ``.npz``, to run outside JAX (on a robot, in another program).

    mjxsac-export runs/<run> --onnx policy.onnx            # verified with onnxruntime
    mjxsac-export runs/<run> --member 3 --npz policy.npz

Both hold the whole map from a raw observation to an action in the env's units: the
observation normalization saved with the policy, the actor's mean head and the tanh
squashing mapped onto the control range. The ONNX model takes ``obs`` (float32, shape
(batch, obs_size), any batch) and gives ``action`` (float32, (batch, action_size)); before
it is reported written, it runs in onnxruntime on observations the policy meets in the MJX
env and its actions are compared with the JAX policy's.

The graph is built with the ONNX project's own ``onnx.helper`` from the actor's parameters
and its Flax module's settings (layers, activation); see docs/DESIGN.md for why not a
generic JAX converter.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mjxsac import normalizer as obs_norm
from mjxsac.cli import (
    UserError,
    debug_requested,
    one_line_errors,
    probe_writable,
    quiet_libraries,
    write,
    write_atomic,
)
from mjxsac.policy import Loaded, act, load, observations
from mjxsac.sac import Trainer

PROG = "mjxsac-export"
INSTALL_EXPORT = 'pip install -e ".[export]"'
TOLERANCE = 1e-4
"""The largest difference, in the env's action units, allowed between the ONNX model's
actions and the JAX policy's on the verification observations (float32 arithmetic in
another order differs by ~1e-7 here)."""
OPSET = 20
"""ONNX opset: 20 is the first with ``Gelu``; onnxruntime 1.16 and later run it."""
SAMPLE_ENVS, SAMPLE_STEPS = 16, 64
"""The verification batch: 16 MJX envs driven by the policy for 64 steps (1,024 rows)."""
NPZ_LAYOUT = (
    "action = action_low + (tanh(h) + 1) / 2 * (action_high - action_low); "
    "h = mlp(clip((obs - obs_mean) / obs_std, -obs_clip, obs_clip)); mlp: for i in "
    "0..n-1, x = activation(x @ kernel_i + bias_i), then h = x @ kernel_n + bias_n "
    "(the mean head); n = layers - 1; gelu is the tanh approximation"
)


def layers(trainer: Trainer, policy: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """The actor's dense layers, (kernel (in, out), bias) in float32, input first; the
    last keeps only the mean head (its first ``action_size`` outputs)."""
    params = policy["actor"]["params"]["MLP_0"]
    count = len(trainer.actor.hidden_sizes) + 1
    out = [
        (np.asarray(params[f"Dense_{i}"]["kernel"]), np.asarray(params[f"Dense_{i}"]["bias"]))
        for i in range(count)
    ]
    kernel, bias = out[-1]
    size = trainer.action_size
    out[-1] = (np.ascontiguousarray(kernel[:, :size]), bias[:size])
    return [(k.astype(np.float32), b.astype(np.float32)) for k, b in out]


def normalization(policy: dict, obs_size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean, std, clip) with ``normalize(obs) = clip((obs - mean) / std, -clip, clip)``;
    the identity (0, 1, inf) when the run did not normalize or had seen no data."""
    stats = policy["normalizer"]
    if not stats.enabled or float(stats.count) <= 0:
        return np.zeros(obs_size, np.float32), np.ones(obs_size, np.float32), float("inf")
    std = np.asarray(jnp.sqrt(stats.var + obs_norm.EPS), np.float32)  # as JAX computes it
    return np.asarray(stats.mean, np.float32), std, obs_norm.CLIP


def weights(loaded: Loaded) -> dict[str, np.ndarray]:
    """The ``.npz`` arrays (``NPZ_LAYOUT``)."""
    trainer = loaded.trainer
    mean, std, clip = normalization(loaded.policy, trainer.obs_size)
    arrays = {"obs_mean": mean, "obs_std": std, "obs_clip": np.float32(clip)}
    for i, (kernel, bias) in enumerate(layers(trainer, loaded.policy)):
        arrays[f"kernel_{i}"], arrays[f"bias_{i}"] = kernel, bias
    return {
        **arrays,
        "activation": np.array(trainer.actor.activation),
        "action_low": np.asarray(trainer.env.action_low, np.float32),
        "action_high": np.asarray(trainer.env.action_high, np.float32),
        "layout": np.array(NPZ_LAYOUT),
    }


def onnx_model(loaded: Loaded):
    """The policy as an ``onnx.ModelProto``: ``obs`` (batch, obs_size) -> ``action``."""
    from onnx import TensorProto, checker, helper, numpy_helper

    trainer, w = loaded.trainer, weights(loaded)
    nodes, constants = [], {}

    def const(name: str, value) -> str:
        constants[name] = numpy_helper.from_array(np.asarray(value, np.float32), name)
        return name

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    x = "obs"
    if np.isfinite(w["obs_clip"]):
        x = node("Sub", [x, const("obs_mean", w["obs_mean"])], "centered")
        x = node("Div", [x, const("obs_std", w["obs_std"])], "scaled")
        clip = float(w["obs_clip"])
        x = node("Clip", [x, const("clip_low", -clip), const("clip_high", clip)], "normalized")
    count = len(trainer.actor.hidden_sizes) + 1
    for i in range(count):
        x = node("Gemm", [x, const(f"kernel_{i}", w[f"kernel_{i}"]),
                          const(f"bias_{i}", w[f"bias_{i}"])], f"dense_{i}")  # fmt: skip
        if i < count - 1:
            x = _activation(node, const, trainer.actor.activation, x, i)
    x = node("Tanh", [x], "squashed")
    low, high = w["action_low"], w["action_high"]
    # The same operations, in the same order, as envs.scale_action.
    x = node("Add", [x, const("one", 1.0)], "shifted")
    x = node("Mul", [x, const("half", 0.5)], "unit")
    x = node("Mul", [x, const("action_range", high - low)], "spread")
    node("Add", [const("action_low", low), x], "action")

    def io_value(name: str, size: int):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", size])

    graph = helper.make_graph(
        nodes,
        "mjxsac_policy",
        [io_value("obs", trainer.obs_size)],
        [io_value("action", trainer.action_size)],
        initializer=list(constants.values()),
    )
    model = helper.make_model(
        graph,
        producer_name="mjxsac",
        opset_imports=[helper.make_opsetid("", OPSET)],
        doc_string=f"{trainer.config.env}: deterministic SAC policy, raw observation -> "
        "action in the env's control range",
    )
    model.ir_version = 10  # onnxruntime 1.20+ reads IR 10
    helper.set_model_props(
        model,
        {"env": trainer.config.env, "checkpoint_step": str(loaded.step),
         "member": str(loaded.member), "algo": trainer.config.algo},
    )  # fmt: skip
    checker.check_model(model, full_check=True)
    return model


def _activation(node, const, name: str, x: str, i: int) -> str:
    """The actor's activation (``mjxsac.networks.ACTIVATIONS``) as ONNX nodes."""
    out = f"hidden_{i}"
    if name == "relu":
        return node("Relu", [x], out)
    if name == "elu":
        return node("Elu", [x], out, alpha=1.0)
    if name == "tanh":
        return node("Tanh", [x], out)
    if name == "gelu":  # flax's nn.gelu default: the tanh approximation
        return node("Gelu", [x], out, approximate="tanh")
    if name == "silu":
        return node("Mul", [x, node("Sigmoid", [x], f"gate_{i}")], out)
    raise UserError(f"the actor's activation {name!r} has no ONNX export yet")


def _imports():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise UserError(f"--onnx needs onnx and onnxruntime: {INSTALL_EXPORT}") from None
    return onnx, onnxruntime


def verify(model_bytes: bytes, loaded: Loaded, seed: int = 0) -> dict:
    """Run the model in onnxruntime on observations the policy meets in MJX (the whole
    batch and a batch of one) and compare with the JAX policy; refuse above
    ``TOLERANCE``."""
    _, ort = _imports()
    trainer, policy = loaded.trainer, loaded.policy
    obs = np.asarray(observations(trainer, policy, SAMPLE_ENVS, SAMPLE_STEPS, jax.random.key(seed)))
    obs = obs[np.all(np.isfinite(obs), axis=1)]
    # The exported graph computes in float32, whatever the run's compute dtype.
    reference = np.asarray(act(trainer, policy, obs, trainer.actor.clone(dtype="float32")))
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    got = session.run(["action"], {"obs": obs})[0]
    one = session.run(["action"], {"obs": obs[:1]})[0]
    diff = float(max(np.max(np.abs(got - reference)), np.max(np.abs(one - reference[:1]))))
    result = {"rows": int(obs.shape[0]), "max_abs_diff": diff, "tolerance": TOLERANCE}
    if trainer.config.compute_dtype != "float32":
        trained = np.asarray(act(trainer, policy, obs))
        result["max_abs_diff_to_" + trainer.config.compute_dtype] = float(
            np.max(np.abs(got - trained))
        )
    if not diff <= TOLERANCE:
        raise UserError(
            f"the ONNX model's actions differ from the JAX policy's by {diff:.3g} (tolerance "
            f"{TOLERANCE:g}) on {obs.shape[0]} observations: not written"
        )
    return result


def _check_out(path: Path, suffix: str, flag: str) -> None:
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory: give a file name such as policy{suffix}")
    if path.suffix.lower() != suffix:
        raise UserError(f"{flag} {path}: the file name must end in {suffix}")
    write(probe_writable, path, what=f"writing {path}")  # creates a missing parent


def export_run(
    checkpoint, member: int | None = None, onnx_path=None, npz_path=None, seed: int = 0
) -> dict:
    """Write the policy of ``member`` (default: the best) as ONNX and/or ``.npz``; returns
    what was written and the verification."""
    if onnx_path is None and npz_path is None:
        raise UserError("nothing to write: give --onnx PATH and/or --npz PATH")
    if onnx_path is not None:
        onnx_path = Path(onnx_path)
        _check_out(onnx_path, ".onnx", "--onnx")
        _imports()
    if npz_path is not None:
        npz_path = Path(npz_path)
        _check_out(npz_path, ".npz", "--npz")
    loaded = load(checkpoint, member, prog=PROG)
    trainer = loaded.trainer
    who = f" member {loaded.member}" if trainer.population_size > 1 else ""
    print(f"{trainer.config.env}{who} at env step {loaded.step:,}: obs {trainer.obs_size} -> "
          f"action {trainer.action_size}, actor {list(trainer.actor.hidden_sizes)} "
          f"{trainer.actor.activation}", flush=True)  # fmt: skip
    result: dict = {"member": loaded.member, "checkpoint_step": loaded.step}
    if onnx_path is not None:
        model_bytes = onnx_model(loaded).SerializeToString()
        check = verify(model_bytes, loaded, seed)
        write(write_atomic, onnx_path, model_bytes, what=f"writing {onnx_path}")
        print(f"wrote {onnx_path} ({len(model_bytes):,} bytes); onnxruntime vs JAX on "
              f"{check['rows']:,} observations from MJX: max abs difference "
              f"{check['max_abs_diff']:.2e} (tolerance {TOLERANCE:g})")  # fmt: skip
        result.update(onnx=str(onnx_path), **check)
    if npz_path is not None:
        arrays, buffer = weights(loaded), io.BytesIO()
        np.savez(buffer, **arrays)
        write(write_atomic, npz_path, buffer.getvalue(), what=f"writing {npz_path}")
        print(f"wrote {npz_path} ({len(arrays) - 1} arrays; layout in its 'layout' entry)")
        result["npz"] = str(npz_path)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="run directory, its checkpoints/ or one step")
    parser.add_argument("--member", type=int, help="population member; default: the best")
    parser.add_argument("--onnx", help="write the policy as ONNX (verified with onnxruntime)")
    parser.add_argument("--npz", help="write the raw weights (numpy .npz, layout inside)")
    parser.add_argument("--seed", type=int, default=0, help="of the verification episodes")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of failures")
    args = parser.parse_args(argv)
    debug = args.debug or debug_requested([])
    quiet_libraries(debug)
    with one_line_errors(PROG, debug):
        export_run(args.checkpoint, args.member, args.onnx, args.npz, args.seed)


if __name__ == "__main__":
    main()

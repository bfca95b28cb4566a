"""Trained policies leave the project: the ONNX graph and the ``.npz`` weights compute what
the JAX policy computes, for every actor the config can build; ``mjxsac-eval`` and
``mjxsac-export`` refuse what they cannot do in one line. The commands on a trained
population are tested in tests/test_population.py (its run is trained once)."""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mjxsac import evaluate, export, networks, presets
from mjxsac import normalizer as obs_norm
from mjxsac.checkpoint import Checkpoints
from mjxsac.cli import UserError
from mjxsac.policy import Loaded, act
from mjxsac.sac import Trainer

ort = pytest.importorskip("onnxruntime")

ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
    "tanh": np.tanh,
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
}


def random_policy(
    seed: int = 0, normalize: bool = True, task: str = "Hopper", **fields
) -> tuple[Loaded, np.ndarray]:
    """A policy (Hopper: 11 observations, 3 actions in [-1, 1]) with random parameters, a
    normalizer fed random data, and a batch of observations."""
    config = presets.config_for(task, fields.pop("algo", "sac-v2"), "cpu")
    config = dataclasses.replace(config, hidden_sizes=(32, 16), **fields).validate()
    trainer = Trainer(config)
    k_actor, k_data, k_obs = jax.random.split(jax.random.key(seed), 3)
    params = trainer.actor.init(k_actor, jnp.zeros((1, trainer.obs_size)))
    # Bigger weights than the initialization's, so that every activation's shape matters.
    params = jax.tree.map(lambda x: 3.0 * x, params)
    stats = obs_norm.init(trainer.obs_size, enabled=normalize)
    data = 2.0 + 5.0 * jax.random.normal(k_data, (500, trainer.obs_size))
    stats = obs_norm.update(stats, data)
    obs = np.asarray(2.0 + 8.0 * jax.random.normal(k_obs, (257, trainer.obs_size)), np.float32)
    return Loaded(trainer, {"actor": params, "normalizer": stats}, 0, 0), obs


def onnx_actions(loaded: Loaded, obs: np.ndarray) -> np.ndarray:
    model = export.onnx_model(loaded).SerializeToString()
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(["action"], {"obs": obs})[0]


def npz_actions(w: dict, obs: np.ndarray) -> np.ndarray:
    """The ``.npz`` layout's formula (export.NPZ_LAYOUT), in numpy."""
    x = np.clip((obs - w["obs_mean"]) / w["obs_std"], -w["obs_clip"], w["obs_clip"])
    n = sum(k.startswith("kernel_") for k in w) - 1
    for i in range(n):
        x = ACTIVATIONS[str(w["activation"])](x @ w[f"kernel_{i}"] + w[f"bias_{i}"])
    h = x @ w[f"kernel_{n}"] + w[f"bias_{n}"]
    return w["action_low"] + (np.tanh(h) + 1) / 2 * (w["action_high"] - w["action_low"])


@pytest.mark.parametrize("activation", sorted(networks.ACTIVATIONS))
def test_onnx_and_npz_compute_the_jax_policy(activation):
    loaded, obs = random_policy(activation=activation)
    want = np.asarray(act(loaded.trainer, loaded.policy, obs))
    assert np.ptp(want) > 0.5  # actions spread over the range, not saturated at one end
    got = onnx_actions(loaded, obs)
    assert got.shape == (257, 3) and got.dtype == np.float32
    assert np.max(np.abs(got - want)) < export.TOLERANCE
    assert np.max(np.abs(npz_actions(export.weights(loaded), obs) - want)) < export.TOLERANCE


@pytest.mark.parametrize(
    "fields",
    [{"algo": "sac-v1"}, {"critic": "c51"}, {"compute_dtype": "bfloat16"}, {"normalize": False}],
    ids=["v1", "c51", "bfloat16", "no-normalizer"],
)
def test_every_actor_the_config_builds_exports(fields):
    normalize = fields.pop("normalize", True)
    loaded, obs = random_policy(normalize=normalize, normalize_obs=normalize, **fields)
    # The export computes in float32 whatever the compute dtype it was trained with.
    reference = loaded.trainer.actor.clone(dtype="float32")
    want = np.asarray(act(loaded.trainer, loaded.policy, obs, reference))
    assert np.max(np.abs(onnx_actions(loaded, obs) - want)) < export.TOLERANCE
    if not normalize:
        assert not np.isfinite(export.weights(loaded)["obs_clip"])


def test_an_untrained_normalizer_exports_as_the_identity():
    loaded, obs = random_policy()
    fresh = obs_norm.init(loaded.trainer.obs_size)
    loaded = loaded._replace(policy={**loaded.policy, "normalizer": fresh})
    want = np.asarray(act(loaded.trainer, loaded.policy, obs))
    assert np.max(np.abs(onnx_actions(loaded, obs) - want)) < export.TOLERANCE


def test_verification_refuses_a_model_that_differs(monkeypatch):
    loaded, _ = random_policy(task="InvertedPendulum")
    good = export.onnx_model(loaded).SerializeToString()
    wrong = export.weights(loaded)
    wrong["kernel_2"], wrong["bias_2"] = -wrong["kernel_2"], -wrong["bias_2"]  # a mirror
    monkeypatch.setattr(export, "weights", lambda _loaded: wrong)
    bad = export.onnx_model(loaded).SerializeToString()
    monkeypatch.undo()
    monkeypatch.setattr(export, "SAMPLE_ENVS", 2)
    monkeypatch.setattr(export, "SAMPLE_STEPS", 8)
    assert export.verify(good, loaded)["max_abs_diff"] < export.TOLERANCE
    with pytest.raises(UserError, match=r"differ from the JAX policy's by .* not written"):
        export.verify(bad, loaded)


@pytest.fixture
def policy_run(tmp_path):
    """A v1 policy checkpoint (actor and normalizer alone), as mjxsac-render loads it; on
    InvertedPendulum, whose env programs compile fastest."""
    loaded, _ = random_policy(algo="sac-v1", task="InvertedPendulum")
    policy = jax.tree.map(lambda x: x[None], loaded.policy)
    ckpt = Checkpoints(tmp_path / "run" / "checkpoints", async_save=False)
    ckpt.save_policy(policy, loaded.trainer.run_config, 1000, [12.0])
    ckpt.close()
    return tmp_path / "run"


def one_line(fn, argv: list[str]) -> str:
    """The message a command exits with."""
    with pytest.raises(SystemExit) as exit_info:
        fn(argv)
    err = str(exit_info.value.code)
    assert "\n" not in err, err
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "nothing to write: give --onnx PATH and/or --npz PATH"),
        (["--onnx", "p.pt"], "the file name must end in .onnx"),
        (["--npz", "{tmp}"], "is a directory"),
        (["--member", "1", "--npz", "p.npz"], "--member 1: the population has members 0..0"),
    ],
)
def test_export_refuses_bad_input_in_one_line(policy_run, tmp_path, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    err = one_line(export.main, [str(policy_run), *argv])
    assert err.startswith("mjxsac-export: ") and message in err


def test_export_refuses_a_missing_run_and_a_missing_extra(tmp_path, monkeypatch):
    err = one_line(export.main, [str(tmp_path / "nothing"), "--npz", "p.npz"])
    assert err.startswith("mjxsac-export: ") and "nothing" in err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    err = one_line(export.main, [str(tmp_path), "--onnx", str(tmp_path / "p.onnx")])
    assert err == 'mjxsac-export: --onnx needs onnx and onnxruntime: pip install -e ".[export]"'


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--episodes", "0"], "--episodes must be a positive integer, got 0"),
        (["--video", "v.mp4"], "--video records Gymnasium's episodes: add --gymnasium"),
        (["--gymnasium", "--video", "v.txt"], "a video needs one of the extensions"),
        (["--member", "-1"], "--member -1: the population has members 0..0"),
    ],
)
def test_eval_refuses_bad_input_in_one_line(policy_run, argv, message):
    err = one_line(evaluate.main, [str(policy_run), *argv])
    assert err.startswith("mjxsac-eval: ") and message in err


def test_eval_in_gymnasium_refuses_speed_options_and_a_missing_extra(monkeypatch):
    config = dataclasses.replace(
        presets.config_for("Hopper", "sac-v2", "cpu"),
        env_options="iterations=8,ctrl_cost_weight=0.002",
    )
    with pytest.raises(UserError, match=r"env-options iterations=8 have no equivalent"):
        evaluate.gymnasium_kwargs(config)
    task_only = dataclasses.replace(config, env_options="ctrl_cost_weight=0.002")
    assert evaluate.gymnasium_kwargs(task_only) == {"ctrl_cost_weight": 0.002}
    env = evaluate.gymnasium_env(task_only)
    assert env._ctrl_cost_weight == 0.002
    monkeypatch.setitem(sys.modules, "gymnasium", None)
    err = one_line(evaluate.main, ["nowhere", "--gymnasium"])
    assert err == 'mjxsac-eval: --gymnasium needs Gymnasium with MuJoCo: pip install -e ".[eval]"'


def test_eval_and_export_work_on_a_v1_policy_checkpoint(policy_run, tmp_path):
    """A policy checkpoint of SAC v1 (the commands read only the actor and normalizer)."""
    result = evaluate.evaluate_run(policy_run, episodes=2, seed=3)
    assert result["member"] == 0 and result["checkpoint_step"] == 1000
    assert len(result["returns"]) == 2 and all(1 <= n <= 1000 for n in result["lengths"])
    assert (policy_run / "eval_mjx.json").exists()
    written = export.export_run(policy_run, onnx_path=tmp_path / "v1.onnx")
    assert (
        written["max_abs_diff"] < export.TOLERANCE and (tmp_path / "v1.onnx").stat().st_size > 1000
    )


def test_eval_refuses_an_unwritable_json_before_any_episode(policy_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = one_line(evaluate.main, [str(policy_run), "--out", str(blocker / "eval.json")])
    assert err.startswith("mjxsac-eval: writing ") and "choose a path whose parents" in err
    assert "episodes" not in capsys.readouterr().out


def test_a_missing_headless_gl_is_one_line_with_the_fix(monkeypatch):
    """What mjxsac-eval's Gymnasium video (and mjxsac-render) say when MuJoCo finds no
    OpenGL: the backend, the error and the fix."""
    from mjxsac import render

    def no_gl():
        raise AttributeError("'NoneType' object has no attribute 'glGetError'")

    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    with pytest.raises(UserError, match=r"MUJOCO_GL=osmesa .*install libosmesa6 .*MUJOCO_GL=egl"):
        render.headless(no_gl)

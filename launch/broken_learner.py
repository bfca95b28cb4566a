"""Does a learning test notice a broken learner? Runs a learning test's configuration with
one piece of SAC deliberately broken (patched in before anything is traced), so that the
test's assertion can be checked against it (docs/BENCHMARKS.md, "Learning tests").

    python -m launch.broken_learner no-bootstrap RUN_DIR            # population test, v2
    python -m launch.broken_learner no-bootstrap RUN_DIR --algo sac-v1   # v1 test
    python -m launch.broken_learner terminations RUN_DIR
    python -m launch.broken_learner temperature RUN_DIR

Breaks: ``no-bootstrap`` (the critic target is the reward alone), ``terminations`` (the
target bootstraps through terminations), ``temperature`` (the temperature's gradient has
its sign flipped). The compilation cache is off: a broken program must not be cached.
"""

from __future__ import annotations

import argparse
import os

os.environ["MJXSAC_COMPILE_CACHE"] = "off"

import jax.numpy as jnp

from mjxsac import losses
from mjxsac import train as train_cli

# The learning tests' configurations (tests/test_population.py, tests/test_train.py).
TESTS = {
    "sac-v2": ["--seeds", "0-3", "--total-steps", "16000"],
    "sac-v1": ["--seeds", "0-2", "--total-steps", "12000"],
}


def break_learner(kind: str) -> None:
    bellman, alpha = losses._bellman_loss, losses.alpha_loss

    def no_bootstrap(critic, batch, next_v, nets, gamma, reward_scale):
        return bellman(critic, batch, jnp.zeros_like(next_v), nets, gamma, reward_scale)

    def terminations(critic, batch, next_v, nets, gamma, reward_scale):
        batch = batch.replace(terminated=jnp.zeros_like(batch.terminated))
        return bellman(critic, batch, next_v, nets, gamma, reward_scale)

    def temperature(log_alpha, log_prob, **kwargs):
        loss, metrics = alpha(log_alpha, log_prob, **kwargs)
        return -loss, metrics

    if kind == "temperature":
        import mjxsac.sac

        mjxsac.sac.alpha_loss = temperature
    else:
        losses._bellman_loss = {"no-bootstrap": no_bootstrap, "terminations": terminations}[kind]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["no-bootstrap", "terminations", "temperature"])
    parser.add_argument("run_dir")
    parser.add_argument("--algo", choices=list(TESTS), default="sac-v2")
    args = parser.parse_args()
    break_learner(args.kind)
    train_cli.main(["--env", "InvertedPendulum", "--algo", args.algo, "--preset", "cpu",
                    *TESTS[args.algo], "--eval-every", "1", "--run-dir", args.run_dir])  # fmt: skip


if __name__ == "__main__":
    main()

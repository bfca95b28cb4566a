"""Each config field declares its kind, everything by kind is derived from that, and the
compiled programs see the shape fields alone."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from mjxsac import config as cfg
from mjxsac.config import Config
from mjxsac.sac import Trainer

SMALL = dict(env="InvertedPendulum", num_envs=2, eval_envs=2, batch_size=8, buffer_size=64,
             hidden_sizes=(8,), steps_per_chunk=4, warmup_steps=4, updates_per_step=1)  # fmt: skip


def test_every_field_declares_its_kind_under_its_section():
    """A field's kind is on the field, and config.py's section headers say the kind of the
    fields under them."""
    source = (Path(cfg.__file__)).read_text()
    body = source[source.index("class Config:") : source.index("# ---- derived")]
    kind, seen = None, []
    for line in body.splitlines():
        header = re.match(r"    # ---- (shape|population|data|host-only):", line)
        if header:
            kind = {"host-only": "host"}.get(header[1], header[1])
        field = re.match(r"    (\w+): .+ = (shape|population|data|host)\(", line)
        if field:
            assert field[2] == kind, f"{field[1]} is declared {field[2]} under a {kind} header"
            seen.append(field[1])
    assert seen == [f.name for f in dataclasses.fields(Config)]


def test_the_sets_by_kind_are_derived_from_the_declarations():
    kinds = {f.name: f.metadata["kind"] for f in dataclasses.fields(Config)}
    assert {n for n, k in kinds.items() if k == "host"} == cfg.HOST_ONLY
    assert {n for n, k in kinds.items() if k == "data"} == cfg.DATA
    assert cfg.DATA - {"seed"} == cfg.VARIABLE
    assert cfg.HOST_ONLY | {"eval_envs"} | cfg.VARIABLE == cfg.RESUMABLE
    assert set(cfg.HPARAMS) | {s[0] for s in cfg.OPTIMIZER_SETTINGS} == cfg.VARIABLE
    with pytest.raises(ValueError, match="a shape of the program"):
        Config(vary=("batch_size=8,16",)).members()


def test_program_configs_are_equal_across_data_and_host_fields():
    base = Config(**SMALL)
    other = dataclasses.replace(base, gamma=0.9, seed=3, seeds="1-2", total_steps=99)
    assert base.program_view() != other.program_view(), "two members: another program"
    same = dataclasses.replace(base, gamma=0.9, seed=3, actor_lr=1.0, total_steps=99)
    assert base.program_view() == same.program_view()
    assert hash(base.program_view()) == hash(same.program_view())
    view = base.program_view()
    assert (view.batch_size, view.env_steps_per_chunk) == (8, 8)
    for name, kind in (("gamma", "per-member data"), ("seeds", "population"),
                       ("total_steps", "host-only")):  # fmt: skip
        with pytest.raises(AttributeError, match=f"config.{name} is not for compiled.*{kind}"):
            getattr(view, name)


class ReadsGamma(Trainer):
    """A trainer whose update reads a data field from the config while it is traced."""

    def update(self, state, *args):
        state, metrics = super().update(state, *args)
        return state.replace(log_alpha=state.log_alpha * self.config.gamma), metrics


def test_a_traced_read_of_a_data_field_fails_loudly():
    """Were it allowed, gamma would be baked into a program that jit reuses for every
    other gamma (the trainers are equal: their programs are the same)."""
    trainer = ReadsGamma(Config(**SMALL))
    with pytest.raises(AttributeError, match=r"config\.gamma is not for compiled programs"):
        trainer.train_chunk(trainer.init())

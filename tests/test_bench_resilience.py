"""The resilience bench's pure arithmetic: capacity, speech load, config text."""

from __future__ import annotations

import pytest
import yaml

from agent.config import AgentConfig
from bench.resilience import RELAXED_ADMISSION, TIERS_OFF, batch_fps, speech_load, yaml_overrides

pytestmark = pytest.mark.unit


def test_capacity_and_speech_load() -> None:
    # 4 chunks of 16 frames in 0.5 s: 128 frames/s.
    assert batch_fps(4, 16, 0.5) == pytest.approx(128.0)
    # Two sessions speaking half and all of their frames at 25 fps ask for 37.5 frames/s.
    assert speech_load([0.5, 1.0], 75.0) == pytest.approx(0.5)
    assert speech_load([], 75.0) == 0.0


def test_yaml_overrides_load_as_the_same_config() -> None:
    both = {**RELAXED_ADMISSION, **TIERS_OFF}
    via_yaml = AgentConfig.model_validate(yaml.safe_load(yaml_overrides(both)))
    assert via_yaml == AgentConfig().with_overrides(both)


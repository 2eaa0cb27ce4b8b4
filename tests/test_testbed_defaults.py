"""guard.testbed.defaults: the recorded GUARD setting, read and rewritten as data beside the weights."""

import json
import shutil

import pytest

from guard.config import GuardConfig
from guard.testbed import defaults
from guard.testbed.assets import WEIGHTS_DIR
from guard.testbed.defaults import copy_threshold, default_guard_config, record_testbed_setting


def test_recording_a_setting_keeps_the_copy_threshold_and_round_trips_every_field(tmp_path):
    shutil.copy(WEIGHTS_DIR / "guard_default.json", tmp_path / "guard_default.json")
    before = json.loads((tmp_path / "guard_default.json").read_text())
    setting = GuardConfig(guidance_scale=2.0, spike_threshold=4.0, gate_threshold=12.5, gate_detector="linear",
                          gate_weights=(0.0, -5.0, -7.5), gate_steps=2)  # fmt: skip
    record_testbed_setting(setting, "a reason", tmp_path)
    assert default_guard_config(tmp_path) == setting  # blocks None, weights tuple: all round-trip
    after = json.loads((tmp_path / "guard_default.json").read_text())
    assert after["reason"] == "a reason" and copy_threshold(tmp_path) == before["copy_threshold"]
    assert after["copy_threshold_reason"] == before["copy_threshold_reason"]


def test_a_folder_without_a_record_gets_the_published_setting(tmp_path):
    assert defaults.testbed_guard_config(tmp_path) == GuardConfig.preset("guard")
    with pytest.raises(FileNotFoundError, match="no shipped GUARD setting"):
        default_guard_config(tmp_path)

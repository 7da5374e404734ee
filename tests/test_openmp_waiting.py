"""Idle OpenMP threads sleep soon unless the user chose otherwise (checked in fresh processes, as a user starts one)."""

import os
import subprocess
import sys

PRINT_SETTINGS = ("import napari_sam_ft, os, torch; "
                  "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))")


def settings_in_fresh_process(**environment) -> str:
    env = {key: value for key, value in os.environ.items() if key not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(environment)
    return subprocess.run([sys.executable, "-c", PRINT_SETTINGS], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


def test_importing_the_package_before_torch_limits_spinning():
    assert settings_in_fresh_process() == ["3000", "None"]


def test_a_users_own_openmp_choice_is_left_alone():
    assert settings_in_fresh_process(OMP_WAIT_POLICY="ACTIVE") == ["None", "ACTIVE"]
    assert settings_in_fresh_process(GOMP_SPINCOUNT="100000") == ["100000", "None"]


def test_nothing_is_set_once_torch_was_imported_first():
    output = subprocess.run([sys.executable, "-c", "import torch; " + PRINT_SETTINGS],
                            env={key: value for key, value in os.environ.items() if key != "GOMP_SPINCOUNT"},
                            capture_output=True, text=True, check=True).stdout.split()
    assert output[0] == "None"

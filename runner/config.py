"""Runner configuration, from the environment (the operator renders it into the pod).

The settings classes are in ``ifw.core.runner_settings`` (torch-free: the operator and the
local stack name the runner's env through them); the runner imports them from here.
"""

from __future__ import annotations

from functools import lru_cache

from ifw.core.runner_settings import RunnerSettings, WorkerSettings

__all__ = ["RunnerSettings", "WorkerSettings", "get_settings"]


@lru_cache
def get_settings() -> RunnerSettings:
    return RunnerSettings()

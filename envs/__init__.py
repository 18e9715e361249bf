"""Environments: Atari vector env, single eval/video env, memory tasks, any gymnasium env.

Importing the package registers the memory task's gymnasium id (``envs.memory``).
"""

from envs import memory as _memory  # noqa: F401  (registers deltabeast/Memory-v0)
from envs.base import StepResult, VectorEnv, make_vector_env

__all__ = ["StepResult", "VectorEnv", "make_vector_env"]

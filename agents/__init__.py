"""The neural network: torsos, recurrent cores and the actor-critic (pure torch, DESIGN §1)."""

from agents.agent import INIT_SCHEMES, ActorCritic, build_agent, core_input_size, initialize_
from agents.cores import CORE_NAMES, make_core
from agents.torso import TORSO_NAMES, make_torso

__all__ = [
    "CORE_NAMES",
    "INIT_SCHEMES",
    "TORSO_NAMES",
    "ActorCritic",
    "build_agent",
    "core_input_size",
    "initialize_",
    "make_core",
    "make_torso",
]

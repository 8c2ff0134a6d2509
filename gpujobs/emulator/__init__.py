"""A local emulator of the Vast.ai REST API, for tests and demos without a real account."""

from gpujobs.emulator.app import Emulator
from gpujobs.emulator.errors import EmulatorError, FaultPlanError
from gpujobs.emulator.faults import FaultPlan, FaultRule
from gpujobs.emulator.standalone import main, serve

__all__ = ["Emulator", "EmulatorError", "FaultPlan", "FaultPlanError", "FaultRule", "main",
           "serve"]

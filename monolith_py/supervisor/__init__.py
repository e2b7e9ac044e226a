"""Supervisor: start a job's roles, watch heartbeats, restart and restore what fails,
detect stragglers, run chaos, record events and serve the status page (``monolith up``)."""

from monolith_py.supervisor.chaos import Chaos, ChaosConfig
from monolith_py.supervisor.events import EVENT_KINDS, EventLog
from monolith_py.supervisor.pipeline import Pipeline, PipelineConfig, build_pipeline
from monolith_py.supervisor.policy import RecoveryPlan, plan_recovery
from monolith_py.supervisor.spec import KINDS, RoleSpec
from monolith_py.supervisor.status import StatusServer
from monolith_py.supervisor.supervisor import Supervisor, SupervisorConfig

__all__ = ["Chaos", "ChaosConfig", "EVENT_KINDS", "EventLog", "Pipeline", "PipelineConfig",
           "build_pipeline", "RecoveryPlan", "plan_recovery", "KINDS", "RoleSpec",
           "StatusServer", "Supervisor", "SupervisorConfig"]

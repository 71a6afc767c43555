"""The scheduler: pure placement of a ModelDeployment's layers onto nodes."""
from reconciler.scheduler.placement import (
    PlacementPlan,
    ShardAssignment,
    deployment_key,
    node_is_ready,
    place,
    render_plan,
)

__all__ = ["PlacementPlan", "ShardAssignment", "deployment_key", "node_is_ready", "place", "render_plan"]

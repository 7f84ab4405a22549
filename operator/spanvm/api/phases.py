"""Phases, condition types and reasons of the spanvm API, as string enums.

A member is its string (`VMPhase.RUNNING == "Running"`, and it formats as `Running`), so
status read back from the API server compares with them directly. The sets of phases that
mean "the guest has ended" or "the fragment is done" are defined here and nowhere else.
"""

from enum import StrEnum


class VMPhase(StrEnum):
    """The lifecycle phase of a SpanningVM."""

    PENDING = "Pending"
    SCHEDULING = "Scheduling"
    STARTING = "Starting"
    RUNNING = "Running"
    DEGRADED = "Degraded"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    TERMINATING = "Terminating"
    STOPPED = "Stopped"


class FragmentPhase(StrEnum):
    """The lifecycle phase of a VMFragment (written by its node's agent)."""

    PENDING = "Pending"
    STARTING = "Starting"
    RUNNING = "Running"
    PAUSED = "Paused"  # vCPUs held on request; the fabric serves on
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    STOPPING = "Stopping"
    STOPPED = "Stopped"


class RunStrategy(StrEnum):
    """When the guest runs, as KubeVirt's run strategies (RUN_STRATEGY_MEANINGS)."""

    ALWAYS = "Always"
    RERUN_ON_FAILURE = "RerunOnFailure"
    ONCE = "Once"
    MANUAL = "Manual"
    HALTED = "Halted"


class PrintableStatus(StrEnum):
    """A SpanningVM's state in one word for people (KubeVirt's printableStatus)."""

    STOPPED = "Stopped"
    PROVISIONING = "Provisioning"
    STARTING = "Starting"
    RUNNING = "Running"
    PAUSED = "Paused"
    STOPPING = "Stopping"
    TERMINATING = "Terminating"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    DEGRADED = "Degraded"
    ERROR_UNSCHEDULABLE = "ErrorUnschedulable"
    CRASH_LOOP_BACK_OFF = "CrashLoopBackOff"


class DesiredState(StrEnum):
    """What the operator asks of a fragment."""

    RUNNING = "Running"
    PAUSED = "Paused"
    STOPPED = "Stopped"


class ConditionType(StrEnum):
    """The conditions of a SpanningVM."""

    SCHEDULED = "Scheduled"
    FABRIC_READY = "FabricReady"
    READY = "Ready"


class Reason(StrEnum):
    """Condition and Event reasons: one CamelCase word saying why (Events of a phase change
    carry the phase's name)."""

    PLACED = "Placed"
    UNSCHEDULABLE = "Unschedulable"
    SCHEDULED = "Scheduled"
    RESCHEDULING = "Rescheduling"
    RESTARTING = "Restarting"
    RECONCILE_ERROR = "ReconcileError"
    NAME_CONFLICT = "NameConflict"
    WAITING_FOR_OLD_OBJECTS = "WaitingForOldObjects"
    FRAGMENT_DELETED = "FragmentDeleted"
    FRAGMENT_FAILED = "FragmentFailed"
    GUEST_FINISHED = "GuestFinished"
    NODE_LOST = "NodeLost"
    STOPPED = "Stopped"
    FABRIC_CONNECTED = "FabricConnected"
    WAITING_FOR_FRAGMENTS = "WaitingForFragments"
    HALTED = "Halted"
    TERMINATING = "Terminating"
    FORCED_DELETION = "ForcedDeletion"
    GUEST_RUNNING = "GuestRunning"
    FRAGMENTS_STOPPED = "FragmentsStopped"
    PAUSED = "Paused"
    CRASH_LOOP_BACK_OFF = "CrashLoopBackOff"
    STOPPED_BY_REQUEST = "StoppedByRequest"
    WAITING_FOR_START = "WaitingForStart"
    START_REQUESTED = "StartRequested"
    RESTART_REQUESTED = "RestartRequested"
    GUEST_RESTARTED = "GuestRestarted"


# The fragment is done: it never runs again (and holds no capacity).
TERMINAL_FRAGMENT_PHASES = frozenset(
    {FragmentPhase.SUCCEEDED, FragmentPhase.FAILED, FragmentPhase.STOPPED}
)
# The fragment was started (some may have finished since).
STARTED_FRAGMENT_PHASES = frozenset(
    {
        FragmentPhase.RUNNING,
        FragmentPhase.PAUSED,
        FragmentPhase.SUCCEEDED,
        FragmentPhase.STOPPING,
        FragmentPhase.STOPPED,
    }
)
# The guest has ended.
FINISHED_VM_PHASES = frozenset({VMPhase.SUCCEEDED, VMPhase.FAILED})
# Every fragment was made and the guest got going.
STARTED_VM_PHASES = frozenset({VMPhase.STARTING, VMPhase.RUNNING, VMPhase.DEGRADED})

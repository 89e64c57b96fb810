"""Label vocabularies of the 4DThinker QA data and the DSR benchmark (REFERENCE-SPEC §4.1, §5.1, §10.5).

These strings are part of the interchange format: released data and checkpoints were trained on them,
so their spelling and order are fixed. Constants only.
"""

from __future__ import annotations

from types import MappingProxyType

# --- Camera motion -------------------------------------------------------------------------------

CAMERA_LABELS: tuple[str, ...] = (
    "Pan Right",
    "Pan Left",
    "Dolly In",
    "Dolly Out",
    "Roll Clockwise",
    "Roll Counter-Clockwise",
    "Tilt Up",
    "Tilt Down",
    "Pedestal Up",
    "Pedestal Down",
    "Truck Left",
    "Truck Right",
)

# SpatialVID's instructions.json abbreviates the two roll labels; every other label is written in full.
CAMERA_LABEL_ABBREVIATIONS = MappingProxyType(
    {"Roll CW": "Roll Clockwise", "Roll CCW": "Roll Counter-Clockwise"}
)

# SpatialVID's label for a step with no movement above threshold. It is not a camera movement: it has
# no opposite and is never a QA answer.
CAMERA_STAY = "Stay"

_CAMERA_PAIRS = (
    ("Pan Right", "Pan Left"),
    ("Dolly In", "Dolly Out"),
    ("Roll Clockwise", "Roll Counter-Clockwise"),
    ("Tilt Up", "Tilt Down"),
    ("Pedestal Up", "Pedestal Down"),
    ("Truck Left", "Truck Right"),
)
CAMERA_OPPOSITES = MappingProxyType(
    {a: b for a, b in _CAMERA_PAIRS} | {b: a for a, b in _CAMERA_PAIRS}
)

# --- Object motion (dynamic QA) ------------------------------------------------------------------

STATIONARY = "Stationary"

OBJECT_DIRECTIONS: tuple[str, ...] = (
    "Moving Left",
    "Moving Right",
    "Moving Up",
    "Moving Down",
    "Moving Left-Up",
    "Moving Left-Down",
    "Moving Right-Up",
    "Moving Right-Down",
    "Moving Toward Camera",
    "Moving Away from Camera",
    STATIONARY,
)

_DIRECTION_PAIRS = (
    ("Moving Left", "Moving Right"),
    ("Moving Up", "Moving Down"),
    ("Moving Left-Up", "Moving Right-Down"),
    ("Moving Left-Down", "Moving Right-Up"),
    ("Moving Toward Camera", "Moving Away from Camera"),
)
# Stationary has no opposite.
DIRECTION_OPPOSITES = MappingProxyType(
    {a: b for a, b in _DIRECTION_PAIRS} | {b: a for a, b in _DIRECTION_PAIRS}
)

# Near-miss directions offered as distractors after the opposite (REFERENCE-SPEC §5.2 step 10).
DIRECTION_RELATED = MappingProxyType(
    {
        "Moving Left": ("Moving Left-Up", "Moving Left-Down"),
        "Moving Right": ("Moving Right-Up", "Moving Right-Down"),
        "Moving Up": ("Moving Left-Up", "Moving Right-Up"),
        "Moving Down": ("Moving Left-Down", "Moving Right-Down"),
        "Moving Left-Up": ("Moving Left", "Moving Up"),
        "Moving Left-Down": ("Moving Left", "Moving Down"),
        "Moving Right-Up": ("Moving Right", "Moving Up"),
        "Moving Right-Down": ("Moving Right", "Moving Down"),
        "Moving Toward Camera": ("Moving Down", "Moving Up"),
        "Moving Away from Camera": ("Moving Up", "Moving Down"),
        STATIONARY: ("Moving Left", "Moving Right"),
    }
)

SPEED_LABELS: tuple[str, ...] = (
    "Speeding Up",
    "Slowing Down",
    "Maintaining a Constant Speed",
    "First Speeding Up, Then Slowing Down",
    "First Slowing Down, Then Speeding Up",
    "Moving at Varying Speeds",
)

DISTANCE_CLOSER = "Getting Closer to Camera"
DISTANCE_FARTHER = "Getting Farther from Camera"
DISTANCE_SAME = "Maintaining Roughly the Same Distance"
DISTANCE_LABELS: tuple[str, ...] = (DISTANCE_CLOSER, DISTANCE_FARTHER, DISTANCE_SAME)
# Never a correct answer; they only fill the fourth distance option.
DISTANCE_EXTRA_DISTRACTORS: tuple[str, ...] = (
    "First Getting Closer, Then Farther",
    "First Getting Farther, Then Closer",
)

# The DSR benchmark's sub-task keys and columns live with the benchmark: fourdthinker.dsr.SUBTASKS.

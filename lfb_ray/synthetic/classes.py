"""The synthetic dataset's vocabulary: classes, label families, actor looks and cue colours.

Every other module of the generator (and the report) reads these; the rules they encode are in
docs/synthetic_dataset.md.
"""

from __future__ import annotations

from dataclasses import dataclass

GENERATOR_VERSION = "1.4"
FPS = 30
AVA_START_SECOND = 900
CUE_HALF_FRAMES = 15  # cue visible on 31 frames (~1 s) centred on its second: 2-3 keyframe clips see it, on 1-2 of 4 frames
SPEED_RANGE = (0.11, 0.19)  # px/s as a fraction of frame width; max < 3*min keeps labels readable
EDGE_MARGIN_PX = 2


@dataclass(frozen=True)
class SyntheticClass:
    """One action class: AVA-style id, name, and family ("short_term" or "long_term")."""

    action_id: int
    name: str
    family: str


# Ids in AVA's person-movement range (short-term) and person-interaction range (long-term); all are
# among AVA's 60 evaluated ids, so evaluation code needs no special case.
MOTION_CLASSES = (
    SyntheticClass(11, "move left", "short_term"),
    SyntheticClass(12, "stand still", "short_term"),
    SyntheticClass(13, "move right", "short_term"),
)
ROLE_CLASSES = (
    SyntheticClass(64, "role A (red cue)", "long_term"),
    SyntheticClass(65, "role B (green cue)", "long_term"),
    SyntheticClass(66, "role C (blue cue)", "long_term"),
)
SHAPES = ("rectangle", "ellipse")
PATTERNS = ("hstripes", "vstripes", "checker", "diagonal", "dots")
# Actor looks come from one small pool shared by every video: (shape, pattern, hue). Each look is
# seen with every role across videos, so a look says nothing about the role and a short-term
# model cannot learn "this look -> that role" by memorising training actors; the role cue is the
# only clip-level evidence. Within a video looks are distinct, so the bank can be matched by look.
APPEARANCE_POOL = tuple((SHAPES[k % 2], PATTERNS[k % len(PATTERNS)], k / 8) for k in range(8))
# The look is also labelled (AVA pose-range ids, all evaluated), like AVA's pose classes that are
# visible in any frame: the bank is only useful if its features say *whose* they are, and a
# baseline trained from scratch on motion and roles alone learns nothing about looks.
# An actor's size comes from its look and a video's background from a pool shared by the dataset,
# so several training actors share each (look, background) and a head cannot memorise actors by
# them (docs/synthetic_dataset.md, "Why looks and backgrounds are shared").
LOOK_HEIGHT_FRACTION = tuple(0.25 + 0.08 * ((3 * k) % 8) / 7 for k in range(8))  # of the frame height
LOOK_ASPECT = tuple(0.55 + 0.30 * ((5 * k) % 8) / 7 for k in range(8))  # width / height
BACKGROUND_POOL = 4
APPEARANCE_CLASSES = tuple(
    SyntheticClass(aid, f"look {k} ({shape} {pattern})", "appearance")
    for k, (aid, (shape, pattern, _)) in enumerate(zip((1, 3, 4, 5, 6, 7, 8, 9), APPEARANCE_POOL, strict=True))
)
CLASSES = MOTION_CLASSES + ROLE_CLASSES + APPEARANCE_CLASSES
LABEL_FAMILIES = {
    "short_term": tuple(c.action_id for c in MOTION_CLASSES),
    "long_term": tuple(c.action_id for c in ROLE_CLASSES),
    "appearance": tuple(c.action_id for c in APPEARANCE_CLASSES),
}
MOTION_DIRECTION = (-1, 0, 1)  # per MOTION_CLASSES index: x velocity sign
# Saturated cue colours; actor bodies stay below saturation 0.45 so a cue never looks like a body.
ROLE_CUE_RGB = ((255, 30, 30), (30, 255, 30), (40, 90, 255))

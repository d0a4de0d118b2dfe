"""SynthAffWild: the synthetic twin of Aff-Wild2 that the book runs on by default, in the ABAW 2020 layout.

- :mod:`mtanet.synth.generate`: :func:`write_synth` writes a named size (:data:`SIZES`, the one registry of the
  sizes) with its noise-free latent labels and, per split, the reference and the floor (:data:`CEILING_FILE`); :func:`resolve_data_root` turns a
  notebook's ``data_root`` parameter into a root, writing the synthetic default on first use.
- :mod:`mtanet.synth.render`: the parametric renderer of 112x112 aligned face crops driven by action units
  (:func:`render_face`, :func:`landmarks`, :class:`Identity`, :class:`Nuisance`); the crop side is
  ``mtanet.synth.render.SIZE``.
"""

from __future__ import annotations

from mtanet.synth.generate import (
    AU_ACTIVE,
    BOUND_DEFINITIONS,
    CEILING_FILE,
    CIRCUMPLEX,
    CONFUSIONS,
    DEFAULT_SIZE,
    EDITION,
    EPISODE_EXPRESSIONS,
    EXPR_ACTIVE,
    GENERATOR_VERSION,
    LATENT_DIR,
    MANIFEST_FILE,
    PARTIAL_MARKER,
    PROTOTYPES,
    SIZES,
    SPLIT_SHARES,
    VA_ANNOTATORS,
    SubjectTraits,
    SynthSize,
    VideoPlan,
    VideoSpec,
    annotate,
    bounds,
    default_data_root,
    format_annotation,
    latent_labels,
    load_latent,
    plan_person,
    plan_videos,
    resolve_data_root,
    split_bounds,
    subject_traits,
    write_synth,
)
from mtanet.synth.render import (
    ACTIONS,
    LABELED_ACTIONS,
    Identity,
    Nuisance,
    five_points,
    landmarks,
    random_identity,
    random_nuisance,
    render_face,
)

__all__ = [
    # generate
    "EDITION",
    "CEILING_FILE",
    "MANIFEST_FILE",
    "PARTIAL_MARKER",
    "LATENT_DIR",
    "GENERATOR_VERSION",
    "SynthSize",
    "SIZES",
    "DEFAULT_SIZE",
    "SPLIT_SHARES",
    "VA_ANNOTATORS",
    "SubjectTraits",
    "VideoSpec",
    "subject_traits",
    "plan_videos",
    "split_bounds",
    "bounds",
    "BOUND_DEFINITIONS",
    "EPISODE_EXPRESSIONS",
    "PROTOTYPES",
    "CIRCUMPLEX",
    "CONFUSIONS",
    "AU_ACTIVE",
    "EXPR_ACTIVE",
    "VideoPlan",
    "plan_person",
    "latent_labels",
    "annotate",
    "format_annotation",
    "write_synth",
    "load_latent",
    "default_data_root",
    "resolve_data_root",
    # render
    "ACTIONS",
    "LABELED_ACTIONS",
    "Identity",
    "Nuisance",
    "five_points",
    "landmarks",
    "random_identity",
    "random_nuisance",
    "render_face",
]

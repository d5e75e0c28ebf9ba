"""Stage: the whole POST pipeline from one YAML file (``post run CONFIG``, ``post demo``).

distil → tune (non-private and DP) → transfer → baselines → attack → table → report, every step
calling the same stage function as its own command, each into its own run directory under
``out``. The steps and which party runs each:

========================  ==========  =====================================================
step                      party       what
========================  ==========  =====================================================
distill                   provider    the student Φs (skipped when ``student`` names one)
undistilled               provider    the same layers without distillation (optional)
zero-shot                 user        Φt zero-shot on test                      (table cell)
tune-source[-dp]          user        ps on Φs with the private data            (PT on Φs)
tune-target[-dp]          baseline    prompt tuned on Φt: the data goes to the provider
transfer[-dp]             provider    POST: pt from ps with public data only (α measured on
                                      public labelled data: no private text reaches Φt)
eval-post[-dp]            user        Φt with pt on test                        (POST)
eval-direct[-dp]          user        Φt with ps as it is                       (direct transfer)
eval-proxy[-dp]           user        Φt + (Φs(ps) − Φs) at query time         (proxy tuning)
zst[-dp], eval-zst[-dp]   provider    zero-shot continuous prompt transfer     (ZST)
…-undistilled[-dp]        both        tune on the undistilled layers, transfer, evaluate
attack[-dp]               user        LiRA on prompts tuned like ps
tune-public, reconstruct  user        nearest-token reading of every prompt vs a control
                                      prompt tuned on public data (optional)
table, report             both        the results table and the HTML/Markdown report
========================  ==========  =====================================================

``[-dp]`` stands for the privacy mode's suffix: none (non-private), ``-dp`` (the dp section's ε),
or ``-dp-eps<E>`` for each extra ε of a privacy–utility curve (``modes: [..., dp-eps1]``).

The package:

- :mod:`post.pipeline.config`: :class:`PipelineConfig`, loading a YAML file or a built-in config with
  ``key=value`` overrides, the privacy modes;
- :mod:`post.pipeline.steps`: the table above as declarations (one :func:`~post.pipeline.steps.declare`
  per row: name, party, stage function, config section, inputs by reference to other rows' typed
  results), the documented merge order of a step's options, and the dry run built from the same rows;
- :mod:`post.pipeline.run`: running the steps (each skipped, resumed or re-run by its key), then the
  table and the report.

Each step's *key* is a hash of its resolved config and its inputs' keys, kept in
``pipeline.json``. A step whose result exists under the same key is skipped; a step whose key
changed (its own options, or anything upstream) is re-run from scratch and the pipeline says
why; a step interrupted half-way resumes from its own checkpoint.
"""

from post.pipeline.config import (
    MODES,
    OPTIONAL_SECTIONS,
    SECTIONS,
    PipelineConfig,
    builtin_configs,
    load_pipeline_config,
    mode_epsilon,
    mode_suffix,
    parse_override,
)
from post.pipeline.run import STATE_FILE, plan_pipeline, run_pipeline
from post.pipeline.steps import STEPS, Step, StepDecl, build_steps, check_steps, declare, dry_run

__all__ = ["MODES", "OPTIONAL_SECTIONS", "SECTIONS", "STATE_FILE", "STEPS", "PipelineConfig", "Step", "StepDecl",
           "build_steps", "builtin_configs", "check_steps", "declare", "dry_run", "load_pipeline_config",
           "mode_epsilon", "mode_suffix", "parse_override", "plan_pipeline", "run_pipeline"]

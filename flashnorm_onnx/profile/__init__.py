"""Latency comparison of two ONNX models (baseline A, candidate B) in ONNX Runtime: the public names.

Used by ``flashnorm-onnx profile``. The method:

* Inputs are generated as ``optimize``'s verification does (:mod:`flashnorm_onnx.verify.inputs`):
  token ids within the vocabulary, masks of ones, positions after the past. A shape with a
  ``past`` length runs one step on a KV cache of that length (only for models with cache
  inputs; others skip it, with the reason).
* Both sessions are created in one process with the same options and share ONE intra-op
  thread pool (ORT's process-wide pool, ``use_per_session_threads = False``). With a pool per
  session, the workers of the session that just ran keep spinning
  (``session.intra_op.allow_spinning``, on by default) while the other session runs, and on a
  machine with few cores they take its cores: measured on SmolLM2 (2 cores, 1x128), a run that
  followed the other model took 385 ms, one that followed itself 324 ms, and the A B / B A order
  made every sample a draw from that mixture. One shared pool serves both sessions with the
  same threads, so neither competes with the other, and spinning stays on as in deployment.
* After ``warmup`` runs of each, the two are measured interleaved, in pairs whose order
  alternates (A B, B A, A B ...), so drift (thermal, frequency, a neighbour's load) hits both.
* Inputs and outputs go through IO binding: on CUDA every input, output and KV-cache tensor is
  on the device, so a run times the model, not host copies. Outputs are bound to buffers
  allocated once (required by ``--cuda-graph``).
* Statistics per model: median, p90, p99, mean, min, tokens/s (tokens of the step divided by
  the median). The ratio B/A is the 25%-trimmed mean of the per-pair log ratios log(b_i / a_i)
  (the two runs of a pair are adjacent in time, so drift cancels within a pair; stalls fall in
  the trimmed quarters), with a 95% t interval whose standard error comes from a circular block
  bootstrap over ABBA units (two neighbouring pairs, A B then B A: both orders in every
  resample; neighbouring pairs may be correlated); "no significant difference" when it holds 1.
  A model against itself claims a difference 4.5-7% of the time on simulated machines and 7% on
  real models under load (``benchmarks/RESULTS_aa.md``). Units are ordered at random afresh in
  every run and the garbage collector is off while timing, so that nothing favours one model in
  every run.
* Rounds (:mod:`flashnorm_onnx.profile.rounds`): two sessions of one file differ in speed by a
  few percent with their order of creation, fixed for their life, which the pairs of one session
  pair cannot show (on a quiet machine a model against itself then claimed a difference in 10 of
  12 runs). Each shape is timed in ``rounds`` (4) rounds, each on a fresh session pair created in
  the opposite order to the one before, and B/A with its interval comes from the rounds
  (:func:`~flashnorm_onnx.profile.stats.rounds_ratio`): 0 false claims in 20 such runs.
* Length: by default at least ``min_runs`` (32) pairs, then the interval is looked at when the
  pair count has grown 1.5x (32, 48, 72, ...), and pairs run until its half-width is at most
  ``target`` (2% of the ratio), or the time budget per shape runs out (checked after every two
  pairs once the minimum is done), or ``max_runs``; the report says which stopped it. A fixed
  ``runs`` measures exactly that many pairs in each round.
* Other load: the 1-minute load average before and after, and the CPU time other processes
  used during the measurement (``/proc/stat`` minus this process); a warning when other work
  competed for the cores.
* ``ops``: ORT's profiler, on separate sessions so that its overhead stays out of the timing;
  kernel time summed by op type and by group (normalization, MatMul/Gemm, attention, other).

Modules, each a lower one imported only by higher ones:

* :mod:`~flashnorm_onnx.profile.shapes` -- ``--shape`` specs;
* :mod:`~flashnorm_onnx.profile.stats` -- summaries and the ratio with its block-bootstrap interval;
* :mod:`~flashnorm_onnx.profile.load` -- other load while measuring;
* :mod:`~flashnorm_onnx.profile.opgroups` -- op groups, ORT's profiler trace;
* :mod:`~flashnorm_onnx.profile.sessions` -- settings, the shared pool, session options, providers;
* :mod:`~flashnorm_onnx.profile.runner` -- one IO-bound run;
* :mod:`~flashnorm_onnx.profile.machine` -- the machine's description;
* :mod:`~flashnorm_onnx.profile.render` -- tables and the plot;
* :mod:`~flashnorm_onnx.profile.measure` -- timing a pair on one shape, the stopping rule;
* :mod:`~flashnorm_onnx.profile.ops` -- op-type profiling of one model;
* :mod:`~flashnorm_onnx.profile.run` -- :func:`profile`, its measuring process and the report.
"""

from flashnorm_onnx.profile.machine import gpu_info
from flashnorm_onnx.profile.opgroups import GROUPS
from flashnorm_onnx.profile.render import latency_table, ops_table, write_plot
from flashnorm_onnx.profile.run import profile
from flashnorm_onnx.profile.sessions import cuda_available_reason
from flashnorm_onnx.profile.shapes import parse_shape
from flashnorm_onnx.profile.stats import bootstrap_ratio

__all__ = [
    "GROUPS",
    "bootstrap_ratio",
    "cuda_available_reason",
    "gpu_info",
    "latency_table",
    "ops_table",
    "parse_shape",
    "profile",
    "write_plot",
]

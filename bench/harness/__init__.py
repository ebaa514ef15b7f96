"""What the bench scripts share, so that each script states only its experiment: its arms, sizes,
table columns and verdicts.

- ``lib``: every name bench takes from compressor (the one file to edit when that API moves);
- ``run``: options (--smoke, --threads, --out, --benchmarks-md, --checkpoint-dir, --report-only;
  ``options(ap, name=default)`` for a script's own, ``pick`` for --models), logging, threads and
  device, a sweep's recipe, errors that end a run, the results document and its publication,
  workers that end with their parent (``exit_with_parent``);
- ``page``: BENCHMARKS.md sections, the machine line, plots published to docs/figures/;
- ``entries``: the resumable entry store (fingerprinted settings) and the time-left clock;
- ``measure``: the dense start of every arm (trained once, weights cached), accuracy under
  attack (clean, ℓ2-FGSM, PGD), sizes (parameters, MACs, c.r.), a CUDA time stamp's sync;
- ``report``: mean ± std cells, Markdown tables, verdict words, a Pareto plot.

A sweep script: ``parser`` + ``add_run_options`` + its own options; ``Run(__file__, args, argv)``;
``EntryStore.of(args, fingerprint, keys)``; within ``run.failing(errors)``, per missing entry, train
and measure, ``store.add``; then ``run.document(...)``, its table and verdicts,
``run.publish(section, doc, markdown)`` and ``run.smoke_check(missing)``.
"""

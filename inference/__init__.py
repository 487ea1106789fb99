"""tricolor inference: a trained generator applied to whole videos.

    colorize.py   `tricolor-colorize`: a video (or frames) in, the colored video out
    model.py      the trained generator: its export, training settings, working size, device
    colorizer.py  frames through G (models/rollout.py) and back to full-resolution RGB
    batch.py      many videos as a Slurm array (slurm/colorize.sbatch): which task does which
    evaluate.py   `tricolor-eval`: score a model against the grey and per-frame baselines
    keyframes.py  colour keyframes (a user's images, or the truth's frames in eval)
    video_in.py   decoding: video files and image folders, upright, one frame at a time
    video_out.py  encoding: H.264 with the input's timestamps and audio, or PNG frames;
                  atomic outputs, and what `--overwrite` may replace
"""

"""tricolor inference: a trained generator applied to whole videos.

    colorize.py   `tricolor-colorize`: a video (or frames) in, the colored video out
    evaluate.py   `tricolor-eval`: score a model against the grey and per-frame baselines
    keyframes.py  colour keyframes (a user's images, or the truth's frames in eval)
    video_io.py   decoding and encoding: frames, timestamps, audio, atomic outputs
"""

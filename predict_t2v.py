"""EasyAnimate V4 text-to-video (and text-to-image with --frames 1): see `python predict_t2v.py --help`."""

from easyanimate.cli import main

if __name__ == "__main__":
    main("t2v")

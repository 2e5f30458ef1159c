"""EasyAnimate V4 video-to-video (--video, --strength): see `python predict_v2v.py --help`."""

from easyanimate.cli import main

if __name__ == "__main__":
    main("v2v")

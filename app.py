"""Start the EasyAnimate web UI: ``python app.py [--host 127.0.0.1] [--port 7860] [--models-dir models]``."""

from easyanimate.ui.app import main

if __name__ == "__main__":
    main()

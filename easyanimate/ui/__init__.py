"""The Gradio web UI and API (``python app.py``): ``app`` lays out the page and serves it, ``generation`` runs
requests one at a time and saves results with their settings, ``safety`` confines every path the server touches."""

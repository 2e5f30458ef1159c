#!/usr/bin/env python
"""Rewrite the captions of a metadata file with a language model behind an OpenAI-compatible chat API (vLLM,
llama.cpp, Ollama, a hosted API), as the original toolkit's caption rewrite; the old caption is kept as
original_text.

    python -m vllm.entrypoints.openai.api_server --model Qwen/Qwen2-7B-Instruct      # or any such server
    python scripts/rewrite_captions.py datasets/clips/metadata.json datasets/clips/metadata_rewritten.json \\
        --api_base http://localhost:8000/v1 --model Qwen/Qwen2-7B-Instruct

The API key, if the server wants one, is read from the environment variable named by --api_key_env
(OPENAI_API_KEY). An interrupted run continues where it stopped when started again with the same output file.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easyanimate.data.captions import (  # noqa: E402
    DEFAULT_TEMPLATE,
    CaptionServiceError,
    ChatClient,
    ChatSettings,
    rewrite_captions,
)
from easyanimate.data.metadata import MetadataError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metadata", help="metadata file (.json, .jsonl or .csv) whose captions to rewrite")
    parser.add_argument("out", help="new metadata file (.json or .jsonl)")
    parser.add_argument("--api_base", required=True, help="the server's OpenAI-compatible base URL, e.g. "
                                                         "http://localhost:8000/v1")
    parser.add_argument("--model", required=True, help="model name the server knows")
    parser.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    parser.add_argument("--template", type=Path, default=None,
                        help="text file with the prompt; {caption} marks where the caption goes (default: a "
                             "rewrite into one detailed English paragraph)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max_tokens", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one answer")
    parser.add_argument("--retries", type=int, default=3, help="tries again after a timeout or server error")
    parser.add_argument("--workers", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--include_empty", action="store_true", help="also send entries whose caption is empty")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        template = args.template.read_text(encoding="utf-8") if args.template else DEFAULT_TEMPLATE
        client = ChatClient(ChatSettings(args.api_base, args.model, os.environ.get(args.api_key_env),
                                         args.temperature, args.max_tokens, args.timeout, args.retries))
        out = rewrite_captions(args.metadata, args.out, client, template, args.workers,
                               skip_empty=not args.include_empty)
    except (ValueError, MetadataError, OSError) as exc:
        parser.error(str(exc))
    except CaptionServiceError as exc:
        print(f"rewrite_captions.py: error: {exc}\n(the captions done so far are kept; run the same command again "
              "to continue)", file=sys.stderr)
        return 1
    print(f"metadata with rewritten captions: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

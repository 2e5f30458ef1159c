"""The demo model: synthetic bilingual shapes data (shapes, dataset), the analytic judge, evaluation, and the
assembly of the shipped model folder (build). See scripts/train_demo.sh and scripts/eval_demo.py."""

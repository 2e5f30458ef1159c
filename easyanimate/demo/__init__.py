"""The demo model: synthetic bilingual shapes data (shapes, dataset), the analytic judge, evaluation, the offline
tiny model folder it starts from (tiny_model; the tests use it too), and the assembly of the shipped model folder
(build). See scripts/train_demo.sh and scripts/eval_demo.py."""

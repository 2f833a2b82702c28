# The two set-up commands of the README. Each creates/updates .venv itself.
.PHONY: env train test

env:
	bash tools/setup_env.sh

train: env
	.venv/bin/sapo-megatron train recipes/tiny_cpu_sapo.yaml $(ARGS)

test: env
	bash tools/run_tests.sh $(ARGS)

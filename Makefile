# The two set-up commands of the README. Each creates/updates .venv itself.
.PHONY: env browser train test

env:
	bash tools/setup_env.sh

# The dashboard's browser test drives Debian's headless Chromium (idempotent; needs root or sudo).
browser:
	bash tools/install_browser.sh

train: env
	.venv/bin/sapo-megatron train recipes/tiny_cpu_sapo.yaml $(ARGS)

test: env browser
	bash tools/run_tests.sh $(ARGS)

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

SYS_PKGS := serf dnsutils iproute2 nftables iptables victoria-metrics
SYS_CMDS := serf dig ip nft iptables victoria-metrics

.PHONY: run test lint sysdeps clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

sysdeps:
	@missing=""; for c in $(SYS_CMDS); do command -v $$c >/dev/null 2>&1 || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages: $(SYS_PKGS)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYS_PKGS); \
	fi

lint: $(STAMP)
	$(BIN)/ruff check gossip node ca proxy tests bench
	$(BIN)/mypy

test: $(STAMP) sysdeps lint
	$(BIN)/pytest -q

run: $(STAMP)
	$(BIN)/python -m node.demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

"""meshnode's HTTP interfaces: the Consul-compatible API lives in node.api.http."""

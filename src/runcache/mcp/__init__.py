"""The MCP server: its tools, their shapes, and the backends they call (an engine or a server)."""

"""The Connect flow: authorization state, the callback, the linking rules, pending links."""

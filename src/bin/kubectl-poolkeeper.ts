#!/usr/bin/env node
/**
 * The kubectl plugin: kubectl runs `kubectl-poolkeeper` from PATH for
 * `kubectl poolkeeper ...`, with the arguments after `poolkeeper`. It is the
 * poolkeeper binary under another name (`kubectl poolkeeper status -n shop`
 * is `poolkeeper status -n shop`).
 */
import './poolkeeper.ts';

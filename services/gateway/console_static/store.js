// The events this console has seen (the latest MAX), shared by the pages: one stream per
// tab, and a page opened later still shows what came before it.

const MAX = 1000;
const seen = [];
const listeners = new Set();

export function addEvent(event) {
  seen.push(event);
  if (seen.length > MAX) seen.splice(0, seen.length - MAX);
  for (const fn of listeners) fn(event);
}

// Forget every event (signing out: the next key must not see this one's).
export function reset() {
  seen.length = 0;
}

export function events() {
  return seen;
}

// Call fn(event) on each new event; returns the function that stops it.
export function onEvent(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

// The invocation.completed events seen, oldest first.
export function completed() {
  return seen.filter((e) => e.kind === "invocation.completed" && e.data?.breakdown);
}

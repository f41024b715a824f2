/**
 * Weighted fair split of an integer capacity, by water-filling: every unit
 * gets weight x level, clamped to [low, high], at the level where the sum
 * meets the capacity; shares are rounded down and the remainder goes one
 * connection at a time to the unit whose next connection is due at the lowest
 * level ((share + 1) / weight), ties broken by key.
 */

/** One claimant of the capacity. */
export interface ShareUnit {
  /** Unique; orders remainders on ties (pod "namespace/name"). */
  key: string;
  weight: number;
  low: number;
  /** Infinity when unbounded. */
  high: number;
  /** false: the unit keeps its rounded-down share (MaxReplicas slots stay equal). */
  takesRemainder: boolean;
}

// Fractions closer than this count as equal, so equal weights break ties by key, not by float noise.
const FRACTION_EPSILON = 1e-9;
const LEVEL_SEARCH_STEPS = 200;

function clamp(value: number, low: number, high: number): number {
  return Math.min(high, Math.max(low, value));
}

/** The water level: the smallest level at which the clamped shares sum to `capacity`. */
function waterLevel(units: readonly ShareUnit[], capacity: number): number {
  // Units come in runs alike (a consumer's pods): each of the search's sums is taken over runs,
  // not over thousands of pods.
  const runs: { weight: number; low: number; high: number; count: number }[] = [];
  for (const u of units) {
    const last = runs[runs.length - 1];
    if (last !== undefined && last.weight === u.weight && last.low === u.low && last.high === u.high) last.count += 1;
    else runs.push({ weight: u.weight, low: u.low, high: u.high, count: 1 });
  }
  const total = (level: number): number => runs.reduce((sum, r) => sum + r.count * clamp(r.weight * level, r.low, r.high), 0);
  let below = 0;
  let above = 1;
  for (let i = 0; i < 1100 && total(above) < capacity; i += 1) above *= 2;
  for (let i = 0; i < LEVEL_SEARCH_STEPS; i += 1) {
    const middle = (below + above) / 2;
    // Once the midpoint is an end point the bounds can no longer move: the remaining steps would change nothing.
    if (middle === below || middle === above) break;
    if (total(middle) < capacity) below = middle;
    else above = middle;
  }
  return above;
}

/**
 * Splits `capacity` among `units`. Requires sum(low) <= capacity. Returns each
 * unit's integer share; the shares sum to at most `capacity` (exactly, unless
 * every unit reaches `high` or some units do not take remainders).
 */
export function fairShares(units: readonly ShareUnit[], capacity: number): Map<string, number> {
  const shares = new Map<string, number>();
  if (units.length === 0) return shares;
  const sumHigh = units.reduce((sum, u) => sum + u.high, 0);
  if (sumHigh <= capacity) {
    for (const u of units) shares.set(u.key, u.high);
    return shares;
  }
  const level = waterLevel(units, capacity);
  let given = 0;
  for (const u of units) {
    const whole = Math.min(u.high, Math.max(u.low, Math.floor(clamp(u.weight * level, u.low, u.high) + FRACTION_EPSILON)));
    shares.set(u.key, whole);
    given += whole;
  }
  // Each leftover connection goes to the unit that would reach its next connection at the lowest
  // level, (share + 1) / weight, compared exactly by cross-multiplying; ties go to the smaller key.
  // A binary heap ordered that way hands them out in O((units + leftover) log units).
  const heap = new RemainderHeap();
  for (const u of units) {
    const share = shares.get(u.key) ?? 0;
    if (u.takesRemainder && share < u.high) heap.push({ unit: u, share });
  }
  while (given < capacity) {
    const best = heap.pop();
    if (!best) break;
    best.share += 1;
    shares.set(best.unit.key, best.share);
    given += 1;
    if (best.share < best.unit.high) heap.push(best);
  }
  return shares;
}

/** A unit in line for a leftover connection, with its share so far. */
interface Candidate {
  unit: ShareUnit;
  share: number;
}

/** True when `a` is due its next connection before `b`: lower (share + 1) / weight, then smaller key. */
function dueBefore(a: Candidate, b: Candidate): boolean {
  const left = (a.share + 1) * b.unit.weight;
  const right = (b.share + 1) * a.unit.weight;
  if (left !== right) return left < right;
  return a.unit.key < b.unit.key;
}

/** Min-heap of candidates by dueBefore. */
class RemainderHeap {
  private readonly items: Candidate[] = [];

  push(item: Candidate): void {
    const items = this.items;
    let index = items.length;
    items.push(item);
    while (index > 0) {
      const parent = (index - 1) >> 1;
      if (!dueBefore(item, items[parent]!)) break;
      items[index] = items[parent]!;
      index = parent;
    }
    items[index] = item;
  }

  pop(): Candidate | undefined {
    const items = this.items;
    const top = items[0];
    const last = items.pop();
    if (top === undefined || last === undefined || items.length === 0) return top;
    let index = 0;
    for (;;) {
      const left = 2 * index + 1;
      if (left >= items.length) break;
      const right = left + 1;
      const child = right < items.length && dueBefore(items[right]!, items[left]!) ? right : left;
      if (!dueBefore(items[child]!, last)) break;
      items[index] = items[child]!;
      index = child;
    }
    items[index] = last;
    return top;
  }
}

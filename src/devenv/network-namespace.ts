/**
 * A network namespace of the test's own, joined to this host by a veth pair
 * on a private /30 and nothing else: no uplink, no default route, so what
 * runs inside reaches only this host and this host reaches only it. A
 * server started inside (`command()`) can then be made to stop answering
 * as a powered-off machine or a cut network does (`blackHole()`: every
 * packet on its link dropped, no RST, no ICMP), with iptables rules that
 * live in the namespace and go with it. Needs root, `ip` and `iptables`.
 */
import { execFileSync } from 'node:child_process';

/** Namespaces of this kind are named `pk-lab-<pid>-<n>`: a run's leftovers are found by their dead pid. */
const NAME_PREFIX = 'pk-lab-';
/** The /30s handed out: 10.251.<n>.<4k>. */
const SUBNET_BASE = '10.251';

let created = 0;

const run = (command: string, args: string[]): string => execFileSync(command, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** A namespace with a veth link to this host and a private /30 on it. */
export class NetworkNamespace {
  readonly name: string;
  /** The address inside the namespace (what a server there listens on). */
  readonly address: string;
  /** This host's end of the link (where connections to `address` come from). */
  readonly hostAddress: string;
  private deleted = false;
  private readonly onExit = (): void => this.deleteSync();
  private readonly dropRules: string[][];

  private constructor(name: string, hostAddress: string, address: string, inner: string) {
    this.name = name;
    this.hostAddress = hostAddress;
    this.address = address;
    this.dropRules = [['INPUT', '-i', inner, '-j', 'DROP'], ['OUTPUT', '-o', inner, '-j', 'DROP']];
  }

  /** Why namespaces cannot be made here, or undefined. */
  static unavailable(): string | undefined {
    if (process.getuid?.() !== 0) return 'not root';
    try {
      run('ip', ['netns', 'list']);
      run('iptables', ['-w', '-S', 'INPUT']);
      return undefined;
    } catch (err) {
      return `ip netns or iptables does not work here (${err instanceof Error ? err.message.split('\n')[0] : String(err)})`;
    }
  }

  /** Creates the namespace and its link; deleted by `delete()`, at process exit, or by the next run if this one was killed. */
  static create(): NetworkNamespace {
    reapAbandoned();
    const taken = new Set([...run('ip', ['-4', '-o', 'addr', 'show']).matchAll(/inet (10\.251\.\d+\.\d+)\//g)].map((m) => m[1]));
    let slot = 0;
    while (taken.has(subnet(slot).host)) slot += 1;
    const { host, inside } = subnet(slot);
    created += 1;
    const name = `${NAME_PREFIX}${process.pid}-${created}`;
    // Interface names have at most 15 characters (pids have at most 7 digits).
    const outer = `pkl${process.pid}.${created}h`;
    const inner = `pkl${process.pid}.${created}n`;
    run('ip', ['netns', 'add', name]);
    const ns = new NetworkNamespace(name, host, inside, inner);
    process.on('exit', ns.onExit);
    try {
      run('ip', ['link', 'add', outer, 'type', 'veth', 'peer', 'name', inner, 'netns', name]);
      run('ip', ['addr', 'add', `${host}/30`, 'dev', outer]);
      run('ip', ['link', 'set', outer, 'up']);
      run('ip', ['-n', name, 'addr', 'add', `${inside}/30`, 'dev', inner]);
      run('ip', ['-n', name, 'link', 'set', inner, 'up']);
      run('ip', ['-n', name, 'link', 'set', 'lo', 'up']);
    } catch (err) {
      ns.deleteSync();
      throw err;
    }
    return ns;
  }

  /** The command prefix that runs a program inside (as `uid`/`gid` when given: entering needs root, the program need not). */
  command(account?: { uid: number; gid: number }): string[] {
    return ['nsenter', `--net=/run/netns/${this.name}`, ...(account ? ['--setuid', String(account.uid), '--setgid', String(account.gid)] : []), '--'];
  }

  /** Drops every packet on the link, both ways: the host inside stops answering without a word. */
  blackHole(): void {
    for (const rule of this.dropRules) run('ip', ['netns', 'exec', this.name, 'iptables', '-w', '-I', ...rule]);
  }

  /** Removes the drop rules: the host answers again. */
  restore(): void {
    for (const rule of this.dropRules) {
      try {
        run('ip', ['netns', 'exec', this.name, 'iptables', '-w', '-D', ...rule]);
      } catch {
        // not in place
      }
    }
  }

  /** Deletes the namespace (its end of the link, and so the pair, goes with it). Processes still inside keep it until they exit: stop them first. */
  delete(): void {
    this.deleteSync();
  }

  private deleteSync(): void {
    if (this.deleted) return;
    this.deleted = true;
    process.off('exit', this.onExit);
    try {
      run('ip', ['netns', 'del', this.name]);
    } catch {
      // gone already
    }
  }
}

/** The `slot`th /30: this host's address and the namespace's. */
function subnet(slot: number): { host: string; inside: string } {
  const third = Math.floor(slot / 64);
  const fourth = (slot % 64) * 4;
  if (third > 255) throw new Error('no free /30 left in 10.251.0.0/16');
  return { host: `${SUBNET_BASE}.${third}.${fourth + 1}`, inside: `${SUBNET_BASE}.${third}.${fourth + 2}` };
}

/** Deletes namespaces of runs whose process is gone (killed before they could). */
function reapAbandoned(): void {
  let names: string[];
  try {
    names = run('ip', ['netns', 'list']).split('\n').map((line) => line.split(' ')[0] ?? '');
  } catch {
    return;
  }
  for (const name of names) {
    if (!name.startsWith(NAME_PREFIX)) continue;
    const pid = Number(name.slice(NAME_PREFIX.length).split('-')[0]);
    if (Number.isInteger(pid) && pid > 0 && !alive(pid)) {
      try {
        run('ip', ['netns', 'del', name]);
      } catch {
        // someone else's, or gone
      }
    }
  }
}

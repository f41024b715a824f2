/**
 * An OpenSSH server on a loopback port with generated host and user keys,
 * for the sidecar's tunnel tests. It allows TCP forwarding and nothing else.
 */
import { execFile, execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, readdirSync, writeFileSync, existsSync } from 'node:fs';
import { createConnection } from 'node:net';
import { userInfo } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { ManagedProcess, freePort, waitUntil, type PidRegistry } from './process.ts';
import { commandOutput, requireBinary } from './system.ts';

/** A running sshd. */
export class SshServer {
  readonly host = '127.0.0.1';
  readonly port: number;
  readonly username: string;
  /** OpenSSH private key (ed25519) accepted for `username`. */
  readonly userPrivateKey: string;
  /** The host's public key line, `ssh-ed25519 AAAA...`. */
  readonly hostPublicKey: string;
  /** `SHA256:...` fingerprint of the host key, as `ssh-keygen -lf` prints it. */
  readonly hostKeyFingerprint: string;
  private process: ManagedProcess;
  private readonly launch: () => ManagedProcess;
  private readonly dir: string;
  private keys = 0;

  private constructor(fields: { dir: string; port: number; username: string; userPrivateKey: string; hostPublicKey: string; process: ManagedProcess; launch: () => ManagedProcess }) {
    this.dir = fields.dir;
    this.port = fields.port;
    this.username = fields.username;
    this.userPrivateKey = fields.userPrivateKey;
    this.hostPublicKey = fields.hostPublicKey;
    this.hostKeyFingerprint = fingerprintOf(fields.hostPublicKey);
    this.process = fields.process;
    this.launch = fields.launch;
  }

  /** Generates keys and starts sshd in the foreground. */
  static async start(runDir: string, registry: PidRegistry): Promise<SshServer> {
    const sshd = requireBinary('sshd', 'openssh-server', ['/usr/sbin/sshd']);
    const keygen = requireBinary('ssh-keygen', 'openssh-client');
    const dir = join(runDir, 'sshd');
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const hostKey = join(dir, 'ssh_host_ed25519_key');
    const userKey = join(dir, 'user_ed25519');
    execFileSync(keygen, ['-q', '-t', 'ed25519', '-N', '', '-C', 'poolkeeper-test-host', '-f', hostKey]);
    execFileSync(keygen, ['-q', '-t', 'ed25519', '-N', '', '-C', 'poolkeeper-test-user', '-f', userKey]);
    const authorizedKeys = join(dir, 'authorized_keys');
    writeFileSync(authorizedKeys, readFileSync(`${userKey}.pub`), { mode: 0o600 });
    // As root, sshd needs its privilege-separation directory.
    if (process.getuid?.() === 0 && !existsSync('/run/sshd')) mkdirSync('/run/sshd', { mode: 0o755 });
    const port = await freePort();
    const config = join(dir, 'sshd_config');
    writeFileSync(config, [
      `Port ${port}`,
      'ListenAddress 127.0.0.1',
      `HostKey ${hostKey}`,
      `PidFile ${join(dir, 'sshd.pid')}`,
      `AuthorizedKeysFile ${authorizedKeys}`,
      'StrictModes no',
      'UsePAM no',
      'PasswordAuthentication no',
      'KbdInteractiveAuthentication no',
      'PubkeyAuthentication yes',
      'PermitRootLogin prohibit-password',
      'AllowTcpForwarding local',
      'AllowAgentForwarding no',
      'X11Forwarding no',
      'PermitTTY no',
      'LogLevel VERBOSE',
      'ClientAliveInterval 5',
      '',
    ].join('\n'));
    const launch = (): ManagedProcess => ManagedProcess.start({ name: 'sshd', command: sshd, args: ['-D', '-e', '-f', config], logFile: join(dir, 'sshd.log') }, registry);
    const child = launch();
    await waitUntil('sshd', () => bannerReceived(port), { timeoutMs: 15_000, process: child });
    const hostPublicKey = readFileSync(`${hostKey}.pub`, 'utf8').trim().split(' ').slice(0, 2).join(' ');
    return new SshServer({ dir, port, username: userInfo().username, userPrivateKey: readFileSync(userKey, 'utf8'), hostPublicKey, process: child, launch });
  }

  /**
   * A new user key (ed25519) that is not authorized yet: `authorize` it.
   * For key rotation tests.
   */
  newUserKey(): { privateKey: string; publicKeyLine: string } {
    this.keys += 1;
    const file = join(this.dir, `user_ed25519_${this.keys}`);
    execFileSync(requireBinary('ssh-keygen', 'openssh-client'), ['-q', '-t', 'ed25519', '-N', '', '-C', `poolkeeper-test-user-${this.keys}`, '-f', file]);
    return { privateKey: readFileSync(file, 'utf8'), publicKeyLine: readFileSync(`${file}.pub`, 'utf8').trim() };
  }

  /** Replaces the authorized keys (sshd reads them at each login); the original user key is no longer accepted unless listed. */
  authorize(publicKeyLines: readonly string[]): void {
    writeFileSync(join(this.dir, 'authorized_keys'), `${publicKeyLines.join('\n')}\n`, { mode: 0o600 });
  }

  /** The public key line of `userPrivateKey`. */
  get userPublicKey(): string {
    return readFileSync(join(this.dir, 'user_ed25519.pub'), 'utf8').trim();
  }

  /** `OpenSSH_9.2p1 ...` as the binary reports it. */
  version(): string {
    return commandOutput('ssh', ['-V']).split(',')[0] ?? 'unknown';
  }

  /** True if the server sends its SSH banner. */
  healthy(): Promise<boolean> {
    return bannerReceived(this.port);
  }

  /** Kills sshd at once (for tunnel-recovery tests). */
  kill(): Promise<void> {
    this.process.signal('SIGKILL');
    return this.process.stop(1000);
  }

  /**
   * Sends `signal` to sshd and to every process under it: the per-connection
   * sshd children call setsid(), so a process-group signal would miss the
   * ones that carry open tunnels. SIGSTOP freezes the bastion with its TCP
   * connections open; SIGCONT thaws it.
   */
  signalAll(signal: NodeJS.Signals): void {
    const root = this.process.pid;
    if (root === undefined || !this.process.running) return;
    for (const pid of [root, ...descendantsOf(root)]) {
      try {
        process.kill(pid, signal);
      } catch {
        // exited meanwhile
      }
    }
  }

  /**
   * The SSH connections sshd serves now: each peer address and the pids of
   * the sshd processes that hold it (from ss(8)).
   */
  async sessions(): Promise<Array<{ peer: string; pids: number[] }>> {
    const { stdout } = await promisify(execFile)(requireBinary('ss', 'iproute2', ['/usr/bin/ss', '/bin/ss']), ['-tnpH', 'state', 'established', `( sport = :${this.port} )`]);
    return stdout.split('\n').filter((line) => line.trim() !== '').map((line) => ({
      // Queue sizes, local address, peer address (no State column with a state filter).
      peer: line.trim().split(/\s+/)[3] ?? '',
      pids: [...line.matchAll(/pid=(\d+)/g)].map((m) => Number(m[1])),
    }));
  }

  /** Ends every SSH connection at once (their sshd processes killed); the listener stays. */
  async endSessions(): Promise<number> {
    const sessions = await this.sessions();
    for (const pid of new Set(sessions.flatMap((s) => s.pids))) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // exited meanwhile
      }
    }
    return sessions.length;
  }

  /** Starts sshd again on the same port and keys (after kill()). */
  async restart(): Promise<void> {
    this.process = this.launch();
    await waitUntil('sshd', () => bannerReceived(this.port), { timeoutMs: 15_000, process: this.process });
  }

  /** Stops sshd. */
  stop(): Promise<void> {
    return this.process.stop(3000);
  }

  /** The process log. */
  get logFile(): string {
    return this.process.logFile;
  }
}

/** `SHA256:<base64 without padding>` of an OpenSSH public key line. */
export function fingerprintOf(publicKeyLine: string): string {
  const blob = Buffer.from(publicKeyLine.trim().split(/\s+/)[1] ?? '', 'base64');
  return `SHA256:${createHash('sha256').update(blob).digest('base64').replace(/=+$/, '')}`;
}

/** Pids of every live descendant of `root`, from /proc (Linux). */
function descendantsOf(root: number): number[] {
  const children = new Map<number, number[]>();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      // The command may contain spaces and parentheses: the ppid follows the last ')'.
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      const list = children.get(ppid) ?? [];
      list.push(Number(entry));
      children.set(ppid, list);
    } catch {
      // exited while listing
    }
  }
  const found: number[] = [];
  const queue = [root];
  while (queue.length > 0) {
    for (const child of children.get(queue.shift()!) ?? []) {
      found.push(child);
      queue.push(child);
    }
  }
  return found;
}

function bannerReceived(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = createConnection({ host: '127.0.0.1', port });
    const done = (ok: boolean): void => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(2000, () => done(false));
    socket.once('data', (data) => done(data.toString('latin1').startsWith('SSH-2.0-')));
    socket.once('error', () => done(false));
  });
}

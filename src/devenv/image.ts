/**
 * The poolkeeper image without Docker or a registry: the layers the
 * Dockerfile's final stage describes (Node 24 and the libraries it links,
 * the compiled dist/, production node_modules, package.json) written as an
 * OCI image archive that `ctr images import` loads. The Dockerfile stays the
 * one users build; test/integration/image-spec.test.ts fails if IMAGE_SPEC
 * and the Dockerfile drift apart. Archives are cached by a hash of their inputs.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, realpathSync, renameSync, rmSync, statSync, utimesSync, writeFileSync, cpSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parse as parseYaml } from 'yaml';
import { kubeVersion } from './kube.ts';
import { MissingPrerequisiteError } from './system.ts';

const REPO_ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

/** What the Dockerfile's final stage sets; checked against the Dockerfile by a test. */
export const IMAGE_SPEC = {
  workdir: '/app',
  user: '65532:65532',
  env: { NODE_ENV: 'production' } as Record<string, string>,
  entrypoint: ['/nodejs/bin/node', '/app/dist/bin/poolkeeper.js'],
  cmd: ['--help'],
  /** COPY sources (build stage or context) and their destinations under workdir, in order. */
  copies: [
    { source: 'node_modules', destination: './node_modules' },
    { source: 'dist', destination: './dist' },
    { source: 'build', destination: './build' },
    { source: 'package.json', destination: './' },
  ],
  /** Where the distroless base keeps node; the entrypoint names it. */
  nodePath: '/nodejs/bin/node',
} as const;

/** PATH of the distroless base, kept so that the images behave alike. */
const BASE_PATH = 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

/** A built image archive. */
export interface ImageArchive {
  /** The OCI archive (a tar of an OCI layout). */
  path: string;
  /** The full reference containerd knows it by, e.g. `docker.io/poolkeeper/poolkeeper:0.1.0`. */
  reference: string;
  /** Sum of the gzipped layers: what a registry would transfer. */
  compressedBytes: number;
  /** Sum of the uncompressed layers: what the image takes on the node. */
  uncompressedBytes: number;
  /** False if it was built by this call, true if it came from the cache. */
  cached: boolean;
}

/** Root of poolkeeper's per-machine build cache. */
export function cacheRoot(): string {
  return process.env.POOLKEEPER_CACHE ?? join(homedir(), '.cache', 'poolkeeper');
}

/** `poolkeeper/poolkeeper:0.1.0` from deploy/base/kustomization.yaml, so the manifests find the image as they are. */
export function deployedImageName(): string {
  const kustomization = parseYaml(readFileSync(join(REPO_ROOT, 'deploy', 'base', 'kustomization.yaml'), 'utf8')) as { images?: { name: string; newName?: string; newTag?: string }[] };
  const entry = kustomization.images?.find((i) => i.name === 'poolkeeper');
  if (!entry?.newName || !entry.newTag) throw new Error('deploy/base/kustomization.yaml names no poolkeeper image');
  return `${entry.newName}:${entry.newTag}`;
}

/** Docker's normalisation: `a/b:t` is `docker.io/a/b:t`, `b:t` is `docker.io/library/b:t`. */
export function fullReference(name: string): string {
  const first = name.split('/')[0] ?? '';
  if (name.includes('/') && (first.includes('.') || first.includes(':') || first === 'localhost')) return name;
  return name.includes('/') ? `docker.io/${name}` : `docker.io/library/${name}`;
}

/**
 * One layer: fills `dir` with its files. With a cache key, the archived layer
 * is kept and reused while the key is unchanged (the base and node_modules
 * change far less often than dist/).
 */
interface LayerSource {
  comment: string;
  cacheKey?: string;
  fill: (dir: string) => void;
}

/** The image config's `config` part. */
interface RuntimeConfig {
  User?: string;
  Env: string[];
  Entrypoint: string[];
  Cmd?: string[];
  WorkingDir?: string;
}

/**
 * Builds (or takes from the cache) the poolkeeper image: the same files at
 * the same paths as the Dockerfile's final stage, with the host's Node 24
 * binary (the `node` package) and the libraries `ldd` lists in place of the
 * distroless base.
 */
export function buildPoolkeeperImage(options: { reference?: string } = {}): ImageArchive {
  const reference = fullReference(options.reference ?? deployedImageName());
  const nodeBinary = realpathSync(join(REPO_ROOT, 'node_modules', '.bin', 'node'));
  const key = inputHash([
    readFileSync(fileURLToPath(import.meta.url)),
    reference,
    JSON.stringify(IMAGE_SPEC),
    execFileSync(nodeBinary, ['--version'], { encoding: 'utf8' }),
    ...['package.json', 'package-lock.json', 'tsconfig.json', 'tsconfig.build.json'].map((f) => readFileSync(join(REPO_ROOT, f))),
    ...treeFiles(join(REPO_ROOT, 'src')).flatMap((f) => [relative(REPO_ROOT, f), readFileSync(f)]),
    readFileSync(join(REPO_ROOT, 'native', 'socket-io.c')),
  ]);
  const builder = readFileSync(fileURLToPath(import.meta.url));
  const workdir = IMAGE_SPEC.workdir.slice(1);
  return cachedArchive(`poolkeeper-${key}`, reference, () => ({
    layers: [
      {
        comment: 'node 24 and the libraries it links (distroless base)',
        cacheKey: inputHash([builder, 'base', readFileSync(nodeBinary)]),
        fill: (dir) => {
          placeDynamicBinary(nodeBinary, dir, IMAGE_SPEC.nodePath);
          writeAccounts(dir);
        },
      },
      {
        comment: 'COPY --from=build /src/node_modules ./node_modules',
        cacheKey: inputHash([builder, 'node_modules', readFileSync(join(REPO_ROOT, 'package-lock.json'))]),
        // npm prune --omit=dev keeps what the lockfile does not mark dev-only.
        fill: (dir) => {
          for (const pkg of productionPackages()) cpSync(join(REPO_ROOT, pkg), join(dir, workdir, pkg), { recursive: true, dereference: false });
        },
      },
      {
        comment: 'COPY --from=build /src/dist ./dist',
        fill: (dir) => run(join(REPO_ROOT, 'node_modules', '.bin', 'tsc'), ['-p', 'tsconfig.build.json', '--outDir', join(dir, workdir, 'dist')], REPO_ROOT),
      },
      {
        comment: 'COPY --from=build /src/build ./build',
        cacheKey: inputHash([builder, 'native', readFileSync(join(REPO_ROOT, 'native', 'socket-io.c')), readFileSync(nodeBinary)]),
        // The sidecar's native socket I/O, built as the Dockerfile's build stage does.
        fill: (dir) => {
          run('bash', [join(REPO_ROOT, 'scripts', 'build-native.sh')], REPO_ROOT);
          mkdirSync(join(dir, workdir, 'build'), { recursive: true });
          copyFileSync(join(REPO_ROOT, 'build', 'socket-io.node'), join(dir, workdir, 'build', 'socket-io.node'));
        },
      },
      {
        comment: 'COPY package.json ./',
        fill: (dir) => {
          mkdirSync(join(dir, workdir), { recursive: true });
          copyFileSync(join(REPO_ROOT, 'package.json'), join(dir, workdir, 'package.json'));
        },
      },
    ],
    config: {
      User: IMAGE_SPEC.user,
      Env: [BASE_PATH, ...Object.entries(IMAGE_SPEC.env).map(([k, v]) => `${k}=${v}`)],
      Entrypoint: [...IMAGE_SPEC.entrypoint],
      Cmd: [...IMAGE_SPEC.cmd],
      WorkingDir: IMAGE_SPEC.workdir,
    },
  }));
}

/** The sandbox image kubelet's pods start with, as containerd is told to name it. */
export const PAUSE_IMAGE = 'registry.k8s.io/pause:3.10';

/**
 * The pause image from the pinned Kubernetes module's own source
 * (build/pause/linux/pause.c), compiled with `gcc -static`.
 */
export function buildPauseImage(): ImageArchive {
  const version = kubeVersion();
  const source = join(kubernetesModuleDir(version), 'build', 'pause', 'linux', 'pause.c');
  if (!existsSync(source)) throw new Error(`pause.c not found at ${source}`);
  const key = inputHash([readFileSync(fileURLToPath(import.meta.url)), readFileSync(source), PAUSE_IMAGE]);
  const gcc = requireTool('gcc', 'gcc');
  return cachedArchive(`pause-${key}`, PAUSE_IMAGE, () => ({
    layers: [{
      comment: `pause from k8s.io/kubernetes@${version}`,
      fill: (dir) => {
        run(gcc, ['-Os', '-static', '-Wall', '-Werror', `-DVERSION=${PAUSE_IMAGE.split(':')[1]}-poolkeeper`, '-o', join(dir, 'pause'), source], dir);
        run('strip', [join(dir, 'pause')], dir);
      },
    }],
    config: { User: '65535:65535', Env: [BASE_PATH], Entrypoint: ['/pause'] },
  }));
}

/** The k8s.io/kubernetes module source for `version` (downloaded by scripts/build-kube.sh). */
function kubernetesModuleDir(version: string): string {
  const go = requireTool('go', 'golang (Go >= 1.26)');
  const out = execFileSync(go, ['mod', 'download', '-json', `k8s.io/kubernetes@${version}`], { encoding: 'utf8', cwd: cacheRootDir(), env: { ...process.env, GOFLAGS: '-mod=mod', GOWORK: 'off' } });
  return (JSON.parse(out) as { Dir: string }).Dir;
}

function cacheRootDir(): string {
  const dir = join(cacheRoot(), 'images');
  mkdirSync(dir, { recursive: true });
  return dir;
}

/** Builds into a staging dir and renames into the cache, so a killed build leaves no half archive. */
function cachedArchive(name: string, reference: string, assemble: () => { layers: LayerSource[]; config: RuntimeConfig }): ImageArchive {
  const dir = cacheRootDir();
  const path = join(dir, `${name}.oci.tar`);
  const sizesFile = `${path}.sizes.json`;
  if (existsSync(path) && existsSync(sizesFile)) {
    const sizes = JSON.parse(readFileSync(sizesFile, 'utf8')) as { compressedBytes: number; uncompressedBytes: number };
    return { path, reference, ...sizes, cached: true };
  }
  const stage = mkdtempSync(join(dir, `.${name}.`));
  try {
    const { layers, config } = assemble();
    const sizes = writeOciArchive(stage, layers, config, reference);
    const tmp = join(stage, 'image.oci.tar');
    run('tar', ['--sort=name', '--mtime=@0', '--owner=0', '--group=0', '--numeric-owner', '-C', join(stage, 'layout'), '-cf', tmp, 'oci-layout', 'index.json', 'blobs'], stage);
    writeFileSync(sizesFile, JSON.stringify(sizes));
    renameSync(tmp, path);
    pruneArchives(dir, name.split('-')[0] ?? name, 3);
    pruneLayers(join(dir, 'layers'), 6);
    return { path, reference, ...sizes, cached: false };
  } finally {
    rmSync(stage, { recursive: true, force: true });
  }
}

/** Keeps the `keep` newest archives of one kind: every source change makes a new one. */
function pruneArchives(dir: string, kind: string, keep: number): void {
  const archives = readdirSync(dir)
    .filter((f) => f.startsWith(`${kind}-`) && f.endsWith('.oci.tar'))
    .map((f) => ({ f, mtime: statSync(join(dir, f)).mtimeMs }))
    .sort((a, b) => b.mtime - a.mtime);
  for (const { f } of archives.slice(keep)) {
    rmSync(join(dir, f), { force: true });
    rmSync(join(dir, `${f}.sizes.json`), { force: true });
  }
}

/** Keeps the `keep` most recently used cached layers. */
function pruneLayers(dir: string, keep: number): void {
  if (!existsSync(dir)) return;
  const layers = readdirSync(dir)
    .filter((f) => f.endsWith('.tar.gz'))
    .map((f) => ({ f, mtime: statSync(join(dir, f)).mtimeMs }))
    .sort((a, b) => b.mtime - a.mtime);
  for (const { f } of layers.slice(keep)) {
    rmSync(join(dir, f), { force: true });
    rmSync(join(dir, `${f}.json`), { force: true });
  }
}

/** Writes an OCI image layout (one manifest) and returns the layer sizes. */
function writeOciArchive(stage: string, layers: LayerSource[], runtime: RuntimeConfig, reference: string): { compressedBytes: number; uncompressedBytes: number } {
  const layout = join(stage, 'layout');
  const blobs = join(layout, 'blobs', 'sha256');
  mkdirSync(blobs, { recursive: true });
  const blob = (content: Buffer): { digest: string; size: number } => {
    const hex = createHash('sha256').update(content).digest('hex');
    writeFileSync(join(blobs, hex), content);
    return { digest: `sha256:${hex}`, size: content.length };
  };
  const layerCache = join(cacheRootDir(), 'layers');
  mkdirSync(layerCache, { recursive: true });
  let compressedBytes = 0;
  let uncompressedBytes = 0;
  const diffIds: string[] = [];
  const layerDescriptors = layers.map((layer, i) => {
    const cached = layer.cacheKey ? join(layerCache, `${layer.cacheKey}.tar.gz`) : undefined;
    let gz: Buffer;
    let meta: { diffId: string; uncompressed: number };
    if (cached && existsSync(cached) && existsSync(`${cached}.json`)) {
      gz = readFileSync(cached);
      // Freshly used: pruning keeps the newest.
      utimesSync(cached, new Date(), new Date());
      meta = JSON.parse(readFileSync(`${cached}.json`, 'utf8')) as typeof meta;
    } else {
      const dir = join(stage, `layer-${i}`);
      mkdirSync(dir, { recursive: true });
      layer.fill(dir);
      const entries = readdirSync(dir).sort();
      // Reproducible: sorted names, epoch mtimes, root-owned (COPY without --chown).
      const tar = execFileSync('tar', ['--sort=name', '--mtime=@0', '--owner=0', '--group=0', '--numeric-owner', '-C', dir, '-cf', '-', ...entries], { maxBuffer: 2 ** 31 });
      meta = { diffId: `sha256:${createHash('sha256').update(tar).digest('hex')}`, uncompressed: tar.length };
      gz = execFileSync('gzip', ['-n', '-6'], { input: tar, maxBuffer: 2 ** 31 });
      rmSync(dir, { recursive: true, force: true });
      if (cached) {
        writeFileSync(`${cached}.json`, JSON.stringify(meta));
        writeFileSync(`${cached}.partial`, gz);
        renameSync(`${cached}.partial`, cached);
      }
    }
    uncompressedBytes += meta.uncompressed;
    diffIds.push(meta.diffId);
    compressedBytes += gz.length;
    return { mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', ...blob(gz) };
  });
  const config = blob(Buffer.from(JSON.stringify({
    architecture: 'amd64',
    os: 'linux',
    config: runtime,
    rootfs: { type: 'layers', diff_ids: diffIds },
    history: layers.map((l) => ({ created_by: l.comment })),
  })));
  const manifest = blob(Buffer.from(JSON.stringify({
    schemaVersion: 2,
    mediaType: 'application/vnd.oci.image.manifest.v1+json',
    config: { mediaType: 'application/vnd.oci.image.config.v1+json', ...config },
    layers: layerDescriptors,
  })));
  writeFileSync(join(layout, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }));
  writeFileSync(join(layout, 'index.json'), JSON.stringify({
    schemaVersion: 2,
    mediaType: 'application/vnd.oci.image.index.v1+json',
    manifests: [{
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      ...manifest,
      platform: { architecture: 'amd64', os: 'linux' },
      annotations: { 'io.containerd.image.name': reference, 'org.opencontainers.image.ref.name': reference.split(':').pop() ?? 'latest' },
    }],
  }));
  return { compressedBytes, uncompressedBytes };
}

/** Copies a dynamically linked binary to `target` under `root` with every library `ldd` lists, at the path the loader looks for it. */
function placeDynamicBinary(binary: string, root: string, target: string): void {
  const dest = join(root, target.slice(1));
  mkdirSync(dirname(dest), { recursive: true });
  copyFileSync(binary, dest);
  chmodSync(dest, 0o755);
  const ldd = execFileSync('ldd', [binary], { encoding: 'utf8' });
  for (const line of ldd.split('\n')) {
    // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
    const path = line.match(/=>\s+(\/\S+)/)?.[1] ?? line.match(/^\s*(\/\S+)\s+\(/)?.[1];
    if (!path) continue;
    const libDest = join(root, path.slice(1));
    mkdirSync(dirname(libDest), { recursive: true });
    copyFileSync(realpathSync(path), libDest);
    chmodSync(libDest, 0o755);
  }
}

/** The accounts distroless' nonroot variant has, and a world-writable /tmp. */
function writeAccounts(root: string): void {
  mkdirSync(join(root, 'etc'), { recursive: true });
  writeFileSync(join(root, 'etc', 'passwd'), 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n');
  writeFileSync(join(root, 'etc', 'group'), 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n');
  mkdirSync(join(root, 'tmp'), { recursive: true });
  chmodSync(join(root, 'tmp'), 0o1777);
  mkdirSync(join(root, 'home', 'nonroot'), { recursive: true });
}

/** node_modules/… paths of the packages `npm prune --omit=dev` keeps, from package-lock.json. */
export function productionPackages(): string[] {
  const lock = JSON.parse(readFileSync(join(REPO_ROOT, 'package-lock.json'), 'utf8')) as { packages: Record<string, { dev?: boolean; link?: boolean }> };
  return Object.entries(lock.packages)
    .filter(([path, meta]) => path !== '' && !meta.dev && !meta.link && existsSync(join(REPO_ROOT, path)))
    .map(([path]) => path)
    // A nested package is copied with its parent already.
    .filter((path, _, all) => !all.some((other) => other !== path && path.startsWith(`${other}/`)));
}

function treeFiles(dir: string): string[] {
  const out: string[] = [];
  for (const entry of readdirSync(dir).sort()) {
    const path = join(dir, entry);
    if (statSync(path).isDirectory()) out.push(...treeFiles(path));
    else out.push(path);
  }
  return out;
}

function inputHash(parts: (string | Buffer)[]): string {
  const hash = createHash('sha256');
  for (const part of parts) hash.update(part).update('\0');
  return hash.digest('hex').slice(0, 16);
}

function requireTool(name: string, debianPackage: string): string {
  try {
    return execFileSync('sh', ['-c', `command -v ${name}`], { encoding: 'utf8' }).trim();
  } catch {
    throw new MissingPrerequisiteError(name, `Install ${debianPackage}.`);
  }
}

function run(command: string, args: string[], cwd: string): void {
  try {
    execFileSync(command, args, { cwd, stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 2 ** 26 });
  } catch (err) {
    const e = err as { stdout?: Buffer; stderr?: Buffer; message: string };
    throw new Error(`${command} ${args.join(' ')} failed: ${e.stdout?.toString() ?? ''}${e.stderr?.toString() ?? e.message}`, { cause: err });
  }
}

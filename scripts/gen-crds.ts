// Writes crds/*.yaml from the schemas in src/api/ (the single source of truth).
// Usage: node scripts/gen-crds.ts
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { renderCrdFiles } from '../src/api/crds.ts';

const root = join(import.meta.dirname, '..');
for (const file of renderCrdFiles()) {
  writeFileSync(join(root, file.path), file.content);
  console.log(`wrote ${file.path}`);
}

// GraphQL Code Generator: typed document nodes for src/operations.graphql,
// checked against the server's schema (the repository's schema.graphql,
// which a test keeps equal to the server's code). A document that no longer
// fits the schema fails `npm run build` here.
//
// TASKQL_SCHEMA and TASKQL_CODEGEN_OUT override the schema read and the file
// written (the tests use them to check that a breaking schema fails).
import type { CodegenConfig } from '@graphql-codegen/cli';

const schema = process.env.TASKQL_SCHEMA ?? '../../schema.graphql';
const out = process.env.TASKQL_CODEGEN_OUT ?? 'src/generated/graphql.ts';

const config: CodegenConfig = {
  schema,
  documents: ['src/operations.graphql'],
  overwrite: true,
  errorsOnly: true,
  generates: {
    [out]: {
      plugins: ['typescript-operations', 'typed-document-node'],
      config: {
        enumsAsTypes: true,
        avoidOptionals: { field: true, inputValue: false, object: false, defaultValue: false },
        scalars: { DateTime: 'string', JSON: 'unknown', ID: 'string' },
        useTypeImports: true,
        skipTypename: true,
        dedupeFragments: true,
      },
    },
  },
};

export default config;

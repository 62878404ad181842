// Compares the schema a client sees through introspection with
// schema.graphql, as graphql-js prints both (sorted, so order does not
// count). Prints one JSON line: { equal, introspected, file } (the printed
// schemas only when they differ).
//
// Env: TASKQL_URL (base URL), TASKQL_TOKEN, SCHEMA_FILE.
import { readFileSync } from 'node:fs';
import {
  buildClientSchema, buildSchema, getIntrospectionQuery, lexicographicSortSchema, printSchema,
} from 'graphql';

const query = getIntrospectionQuery({
  descriptions: true,
  specifiedByUrl: true,
  schemaDescription: true,
  directiveIsRepeatable: true,
  inputValueDeprecation: true,
});
const response = await fetch(`${process.env.TASKQL_URL}/graphql`, {
  method: 'POST',
  headers: {
    'content-type': 'application/json',
    authorization: `Bearer ${process.env.TASKQL_TOKEN}`,
  },
  body: JSON.stringify({ query }),
});
const body = await response.json();
if (body.errors) {
  console.log(JSON.stringify({ equal: false, errors: body.errors }));
  process.exit(0);
}
const print = (schema) => printSchema(lexicographicSortSchema(schema));
const introspected = print(buildClientSchema(body.data));
const file = print(buildSchema(readFileSync(process.env.SCHEMA_FILE, 'utf8')));
const equal = introspected === file;
console.log(JSON.stringify(equal ? { equal } : { equal, introspected, file }));
